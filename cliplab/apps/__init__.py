"""Applications built on the public API: the demo job behind ``cliplab demo`` (:mod:`.demo`) and CLIPPINGS'
multimodal record linkage (:mod:`.clippings`: pooled image + OCR-text embeddings, supervised contrastive training,
single-linkage clustering; ``cliplab link``), with its synthetic records (:mod:`.records`)."""
