"""How weights travel: in the message, or by reference through a shared-memory run folder."""
