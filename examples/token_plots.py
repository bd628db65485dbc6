"""Write the figures of docs/tokens.md with the library's plot helpers (``cliplab.tokens.plots``).

* ``clip4dm_words.png``: CLIP4DM word attributions over a foiled caption (one word replaced by a colour that is
  not in the image), a bar chart from ``token_bar_chart``;
* ``patch_similarity.png``: cosine of every image patch token with a text, over the image (``similarity_overlay``).

    python examples/token_plots.py               # writes docs/img/*.png
    python examples/token_plots.py --out /tmp/x --steps 400

Model: the trained ``shapes-tiny`` when it is shipped (``cliplab.list_pretrained()``), on a synthetic scene.
Otherwise ``test-tiny`` trained here for ``--steps`` contrastive steps (about 30 s on a CPU) on a toy colour task:
three vertical stripes and the caption "a red, a blue and a green stripe". Each figure's title names the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import cliplab
from cliplab.metrics import detect_misalignment
from cliplab.tokens import patch_text_similarity
from cliplab.tokens.plots import similarity_overlay, token_bar_chart

COLOURS = {"red": (210, 25, 25), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (240, 225, 30),
           "purple": (140, 50, 190), "orange": (250, 125, 0), "cyan": (30, 210, 220), "pink": (250, 110, 190)}


def stripes(colours, rng, size=32) -> np.ndarray:
    img = rng.normal(0, 8, (size, size, 3))
    for k, (a, b) in enumerate([(0, 11), (11, 22), (22, 32)]):
        img[:, a:b] += COLOURS[colours[k]]
    return img.clip(0, 255).astype(np.uint8)


def stripe_caption(colours) -> str:
    return f"a {colours[0]}, a {colours[1]} and a {colours[2]} stripe"


def train_colour_toy(steps: int, seed: int = 0):
    """test-tiny, contrastive training on random three-stripe images (token table frozen: only the toy's few words
    are used, and Adam on 3M unused rows would dominate the run time)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = cliplab.create_model("test-tiny", seed=seed)
    model.text.token_embed.weight.requires_grad_(False)
    names = list(COLOURS)
    sets = [[names[i] for i in rng.choice(len(names), 3, replace=False)] for _ in range(3000)]
    pixels = torch.stack([model.preprocess(Image.fromarray(stripes(c, rng))) for c in sets])
    plain = model.tokenize([stripe_caption(c) for c in sets]).ids
    templated = model.tokenize(["A photo depicts " + stripe_caption(c) for c in sets]).ids
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2.5e-3, weight_decay=0.05)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2.5e-3 * min(1.0, (step + 1) / 30) * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.from_numpy(rng.choice(len(sets), 64, replace=False))
        ids = torch.where(torch.rand(64, 1) < 0.5, plain[idx], templated[idx])
        logits, _ = model(pixels[idx], ids)
        target = torch.arange(64)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"trained test-tiny for {steps} steps on the stripe toy (final loss {float(loss.detach()):.3f})")
    return model.eval()


def example(model, name: str):
    """(image, foiled caption, foil word, query text, model label) for the figures."""
    if name == "shapes-tiny":
        from cliplab.data.synthetic import SceneWorld, make_foils

        world = SceneWorld(image_size=model.config.vision.image_size, seed=0, clutter_prob=0.0, word_prob=0.0,
                           min_objects=2, max_objects=3)
        for i in range(100):
            scene = world.sample(i)
            foils = [f for f in make_foils(scene, kinds=("replaced_word",)) if f.changed["attribute"] == "colour"]
            if foils:
                obj = scene.objects[0]
                return (world.render(scene), foils[0].text, foils[0].changed["to"], f"a {obj.colour} {obj.shape}",
                        "shapes-tiny")
        raise RuntimeError("no scene with a colour foil")
    shown = ["red", "blue", "green"]
    image = Image.fromarray(stripes(shown, np.random.default_rng(7)))
    foiled = ["red", "pink", "green"]  # "blue" replaced by a colour absent from the image
    return image, stripe_caption(foiled), "pink", "a red, a red and a red stripe", "test-tiny, stripe toy"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    parser.add_argument("--steps", type=int, default=400, help="training steps of the stand-in (no shapes-tiny)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # tiny matrices
    if "shapes-tiny" in cliplab.list_pretrained():
        name, model = "shapes-tiny", cliplab.load("shapes-tiny").eval()
    else:
        name, model = "test-tiny", train_colour_toy(args.steps)
    image, caption, foil, query, label = example(model, name)

    [r] = detect_misalignment(model, image, caption, mode="most_negative")
    words = [w for w, _ in r.words]
    token_bar_chart(words, [s for _, s in r.words], out / "clip4dm_words.png",
                    title=f"CLIP4DM ({label})\nfoil '{foil}'; most negative '{r.negative_word}'")
    print(f"{caption!r}: most negative word {r.negative_word!r} (foil {foil!r}); "
          f"CLIPScore {r.clip_score:.3f}, F-CLIPScore {r.f_clip_score:.5f}")

    pixels = model.preprocess(image).unsqueeze(0)
    with torch.no_grad():
        img_out = model.encode_image(pixels, output="tokens")
        text = model.encode_text(model.tokenize([query]))
    maps = patch_text_similarity(img_out, text)  # [1, 1, g, g]
    # shown at 4x the model's input size (nearest): the map is drawn over the image's pixel extent
    size = 4 * model.config.vision.image_size
    similarity_overlay(image.resize((size, size), Image.NEAREST), maps[0, 0], out / "patch_similarity.png",
                       title=f"'{query}'\n({label})")
    print(f"wrote {out / 'clip4dm_words.png'} and {out / 'patch_similarity.png'}")


if __name__ == "__main__":
    main()
