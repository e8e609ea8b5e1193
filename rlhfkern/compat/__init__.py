"""Drop-in, signature-compatible replacements for functions of RLHF frameworks (verl, ...)."""
