"""Applications built on the public API (currently: the demo job behind ``cliplab demo``)."""
