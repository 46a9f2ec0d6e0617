"""The ``tricks`` command line: thin, it parses, calls the core, prints."""
