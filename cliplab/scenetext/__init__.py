"""Scene text: words drawn into synthetic scenes (:mod:`.dataset`) and the scene-text methods built on CLIP:
:mod:`.dptr` (decoder pre-training with text only, recognition) and :mod:`.fdp` (focus, distinguish and prompt,
retrieval)."""

from .dataset import DICTIONARY, SceneTextWorld, TextScene, word_image

__all__ = ["DICTIONARY", "SceneTextWorld", "TextScene", "word_image"]
