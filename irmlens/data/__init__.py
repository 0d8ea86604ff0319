"""Corpora and assets: the Pang & Lee movie reviews and the VADER lexicon, fetched into a cache."""
