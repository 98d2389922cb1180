"""Data for any experiment: a data set's files (present, byte-exact, never half-written), the
IDX format, a folder of pictures, and a data module for pictures that fit in memory."""
