"""The HTTP edge, one module per endpoint family; `edge` holds what they all share."""
