"""Image captioning on top of a frozen CLIP: a small shared caption generator (:mod:`.generator`: embedding prefix
-> GRU over a closed word vocabulary, maximum-likelihood training, sampling with log-probs), generic self-critical
sequence training (:mod:`.scst`), and the seed paper CgT-GAN (:mod:`.cgtgan`: CLIP-aggregation reward + text
discriminator reward, unpaired images and corpus)."""

from .generator import BOS, EOS, PAD, CaptionGenerator, WordVocab, train_mle
from .scst import advantages, scst_loss

__all__ = ["BOS", "EOS", "PAD", "CaptionGenerator", "WordVocab", "train_mle", "advantages", "scst_loss"]
