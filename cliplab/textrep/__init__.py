"""Text representation learning: seed papers that learn sentence embeddings from (or alongside) language modelling,
one module per paper, on the real MiniLM and SmolLM2 (``cliplab.text``) and measured on STS-B and held-out Flickr8k
caption-to-caption retrieval (``cliplab.eval.sts``, ``cliplab.eval.paraphrase``).

Modules register themselves with ``cliplab.methods`` (``cliplab methods`` lists them) and their command-line trainer
with ``cliplab.text.training.register_trainer`` (``cliplab textrep train METHOD --texts FILE --steps N -o DIR``); a
trained embedder saves with ``embedder.save(dir)`` and loads by path (``cliplab.text.load_embedder``,
``cliplab eval sts -m DIR``).

The token layer itself (Learn Your Tokens ``ltok``, Zero-Shot Tokenizer Transfer ``zett``, Lexinvariant LMs
``lexinvariant_lm``) is studied on small decoder LMs trained on captions: :mod:`.lm_training` holds what they share
(caption splits, byte / BPE codecs, a few-million-parameter Llama, training, bits per byte) and their runners
(``cliplab textrep lm METHOD``). Discrete text codes (Binary Paragraph Vector, Disambiguated Skip-gram) are in
:mod:`.binary_pv_dsg`, with Hamming search in :mod:`.hamming`.
"""
