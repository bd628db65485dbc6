"""Text generation with a decoder LM: greedy decoding with a key-value cache, and chat prompts rendered from the
model's own chat template (a Jinja template stored with the checkpoint, e.g. in GGUF metadata).

    >>> lm = cliplab.text.load_lm("smollm2-135m")
    >>> lm.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16)
    'The capital of France is Paris.'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..models.lm import LlamaDecoder, TextTokenizer
from ..models.lm.deps import require


def render_chat(template: str, messages: Sequence[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a chat template the way ``transformers``' ``apply_chat_template`` does: a sandboxed Jinja
    environment with ``trim_blocks`` and ``lstrip_blocks``, and ``raise_exception`` for templates that check roles."""
    require("jinja2", "chat templates")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{k}] must be a dict with 'role' and 'content', got {m!r}")
    return env.from_string(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                            **extra)


@dataclass
class Generation:
    """``ids``: the new tokens; ``text``: them decoded (special tokens dropped); ``stopped``: ended at EOS."""

    ids: list[int]
    text: str
    stopped: bool
    prompt_ids: list[int] = field(default_factory=list)


class CausalLM:
    """A decoder LM with its tokenizer, special tokens and chat template."""

    def __init__(self, name: str, model: LlamaDecoder, tokenizer: TextTokenizer, eos_id: int,
                 bos_id: int | None = None, chat_template: str | None = None):
        self.name = name
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.chat_template = chat_template

    def token_text(self, token_id: int | None) -> str:
        """The vocabulary entry of a token id ("" for None)."""
        return "" if token_id is None else (self.tokenizer.tokenizer.id_to_token(int(token_id)) or "")

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError(f"{self.name} has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt,
                           bos_token=self.token_text(self.bos_id), eos_token=self.token_text(self.eos_id))

    @torch.no_grad()
    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, stop_at_eos: bool = True) -> Generation:
        """Greedy decoding: the prompt in one forward pass, then one token at a time from the key-value cache."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt has no tokens")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        cache = self.model.new_cache()
        x = torch.tensor([ids])
        new: list[int] = []
        stopped = False
        while len(new) < max_new_tokens:
            states = self.model(x, cache=cache).tokens
            nxt = int(self.model.logits(states[:, -1]).argmax(-1))
            new.append(nxt)
            if stop_at_eos and nxt == self.eos_id:
                stopped = True
                break
            x = torch.tensor([[nxt]])
        return Generation(new, self.tokenizer.decode(new, skip_special_tokens=True), stopped, ids)

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 128) -> str:
        """The assistant's reply to ``messages`` (``[{"role": "user", "content": ...}, ...]``)."""
        return self.generate(self.apply_chat_template(messages), max_new_tokens).text.strip()

    @torch.no_grad()
    def log_likelihood(self, texts: Sequence[str]) -> tuple[float, int]:
        """Summed next-token log-likelihood of ``texts`` (each scored on its own) and the number of tokens scored;
        ``exp(-total / count)`` is the perplexity. Texts are tokenized as the tokenizer does (a BOS only where it
        adds one, not for SmolLM2), and the first token, which nothing predicts, is not scored: the convention of
        ``transformers`` with ``labels=input_ids``."""
        total, count = 0.0, 0
        for text in texts:
            ids = self.tokenizer.encode(text)
            if len(ids) < 2:
                continue
            x = torch.tensor([ids])
            logp = torch.log_softmax(self.model.logits(self.model(x).tokens[:, :-1]), -1)
            total += float(logp[0].gather(-1, x[0, 1:, None]).sum())
            count += len(ids) - 1
        return total, count
