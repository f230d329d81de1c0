"""A tiny, real detoxify checkpoint for tests and offline smoke runs.

``build_tiny_detoxify(directory)`` writes, without touching the network::

    directory/
      tiny-detoxify-<model_type>.ckpt        torch.save({"config": ..., "state_dict": ...})
      tiny-detoxify-<model_type>-hf/         config.json, vocab.txt, tokenizer_config.json,
                                             special_tokens_map.json

The checkpoint has the layout of detoxify's released ones: ``config.arch.args`` names the
transformers classes and ``config.dataset.args.classes`` the labels (Jigsaw's raw names, which
detoxify renames to ``toxicity``, ``severe_toxicity``, ... when it loads them). detoxify calls
``from_pretrained(arch.args.model_type)`` for the config and the tokenizer, so ``model_type`` is the
absolute path of the ``-hf`` directory. If the directory is moved, that path goes stale:
``pipeline.toxicity`` then looks for a directory of the same name beside the checkpoint.

The weights are random (seeded), so the scores mean nothing; they are still real detoxify outputs,
produced by detoxify's own loading and prediction code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Raw class names as stored in detoxify's released checkpoints; detoxify standardises them on
# load ("toxic" -> "toxicity", "severe_toxic" -> "severe_toxicity", "identity_hate" ->
# "identity_attack").
CLASSES: dict[str, tuple[str, ...]] = {
    "original": ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"),
    "unbiased": (
        "toxicity",
        "severe_toxicity",
        "obscene",
        "identity_attack",
        "insult",
        "threat",
        "sexual_explicit",
    ),
}

MAX_LENGTH = 128  # model_max_length of the tokenizer and max_position_embeddings of the model

_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_PUNCTUATION = tuple(".,!?;:'\"()[]{}-_/\\&%$#@*+=<>|~`^")
_SUFFIXES = ("s", "es", "ed", "ing", "ly", "er", "est", "ion", "al", "ness", "ful", "less", "y")
_WORDS_TEXT = """
the of and to a in is it you that he was for on are with as i his they be at one have this from
or had by not word but what some we can out other were all there when up use your how said an
each she which do their time if will way about many then them write would like so these her long
make thing see him two has look more day could go come did number sound no most people my over
know water than call first who may down side been now find any new work part take get place made
live where after back little only round man year came show every good me give our under name very
through just form sentence great think say help low line differ turn cause much mean before move
right boy old too same tell does set three want air well also play small end put home read hand
port large spell add even land here must big high such follow act why ask men change went light
kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story saw
far sea draw left late run while press close night real life few north open seem together next
white children begin got walk example ease paper group always music those both mark often letter
until mile river car feet care second book carry took science eat room friend began idea fish
mountain stop once base hear horse cut sure watch color face wood main enough plain girl usual
young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock
order fire south problem piece told knew pass since top whole king space heard best hour better
true during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow center
love person money serve appear road map rain rule govern pull cold notice voice unit power town
fine certain fly fall lead cry dark machine note wait plan figure star box noun field rest able
pound done beauty drive stood contain front teach week final gave green oh quick develop ocean warm
free minute strong special mind behind clear tail produce fact street inch multiply nothing course
stay wheel full force blue object decide surface deep moon island foot system busy test record boat
common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate hot miss
brought heat snow tire bring yes distant fill east paint language among stupid idiot hate kill
"""


def _vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    pieces = [*_SPECIAL, *_PUNCTUATION, *letters, *digits]
    pieces += [f"##{p}" for p in (*letters, *digits, *_SUFFIXES)]
    pieces += _WORDS_TEXT.split()
    return list(dict.fromkeys(pieces))  # drop repeats, keep order


def _write_tokenizer(hf_dir: Path) -> int:
    vocab = _vocab()
    hf_dir.joinpath("vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    special = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    tokenizer_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "model_max_length": MAX_LENGTH,
        **special,
    }
    hf_dir.joinpath("tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    hf_dir.joinpath("special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def build_tiny_detoxify(
    directory: str | os.PathLike[str], *, model_type: str = "original", seed: int = 0
) -> Path:
    """Writes a tiny random detoxify checkpoint (BERT, 2 layers, width 32) and returns its path.

    ``model_type`` picks the label set ("original": 6 labels, "unbiased": 7); the architecture is
    always BERT. The same seed gives the same weights.
    """
    import torch
    import transformers

    if model_type not in CLASSES:
        raise ValueError(f"model_type must be one of {sorted(CLASSES)}, got {model_type!r}")
    classes = CLASSES[model_type]
    root = Path(directory).absolute()
    hf_dir = root / f"tiny-detoxify-{model_type}-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(hf_dir)
    config = transformers.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_LENGTH,
        num_labels=len(classes),
        problem_type="multi_label_classification",
        initializer_range=0.5,  # wider than BERT's 0.02, so scores spread across (0, 1)
    )
    config.save_pretrained(hf_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config)
    checkpoint = {
        "config": {
            "arch": {
                "args": {
                    "model_type": str(hf_dir),
                    "model_name": "BertForSequenceClassification",
                    "tokenizer_name": "BertTokenizer",
                    "num_classes": len(classes),
                }
            },
            "dataset": {"args": {"classes": list(classes)}},
        },
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
    }
    path = root / f"tiny-detoxify-{model_type}.ckpt"
    torch.save(checkpoint, path)
    return path
