"""On-disk layouts: magics and structs (``layout``), the image index, pack files, chunk-index files."""
