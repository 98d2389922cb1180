"""Imported first by the workers' fork server (machinery.forking), and nowhere else: the
garbage collector rests while the server imports what the workers need, as a script's own
process does (machinery.collector); each worker, a fork of the server, freezes what it
inherited and turns the collector back on."""

from machinery import collector

collector.pause()
