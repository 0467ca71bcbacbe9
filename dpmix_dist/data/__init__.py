"""Private data: sources -> WebDataset shards -> a node-local uint8 memmap that supports random access."""
