"""Bridges to outside libraries, one module per library. The core never imports them."""
