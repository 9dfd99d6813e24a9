"""Operations: the command line, the console, the demo and the local TLS sink."""
