"""What a DLRM is: the embedding-half spec, the dense half, and the shared row initialiser."""
