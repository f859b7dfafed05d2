"""GLUE tsv -> binarized fairseq data."""
