"""Search a collection by text and by image: embed, index, and serve it over HTTP with a web page."""
