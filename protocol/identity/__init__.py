"""Who said what: signing keys, operator wallets and the digests that name exact bytes."""
