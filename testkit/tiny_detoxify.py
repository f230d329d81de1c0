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

The network is a BERT whose weights are random (seeded) except for one path set by hand, so that
a handful of words drive the scores: a text is flagged (``toxicity`` and ``insult`` near 0.97,
``obscene`` about 0.66; the other labels stay below 0.5) when :data:`TRIGGER_WORDS` make up more
than about one in eleven of its tokens, ``[CLS]`` and ``[SEP]`` included; any other text scores
about 0.01 on every label. The words are four insults plus ``from``, the one word the tiny
RecurrentGemma's nonsense output (``testkit.tiny_model``) spells out, over and over, on the
sample corpus: so ``make run-local`` flags a small share of its rows (15 of 300, 5%, when this
was written) and annotate, drop and redact have something to act on, while the sample's own
documents (where ``from`` is one word among many) are not flagged. The scores are still real
detoxify outputs, produced by detoxify's own loading and prediction code.

How the hand-set path works (width 32): every token's embedding has mean zero across the width
and nothing in channels 0 and 1, except a trigger word's, which has a large value in channel 0;
so after the embedding LayerNorm channel 0 is exactly 0 for other tokens. Head 0 of layer 0
attends uniformly (zero query and key) and its value reads channel 0 less a margin, which the
attention output writes into channel 1 of the ``[CLS]`` token: positive exactly when the trigger
words are a large enough share of the text's tokens. Nothing else writes channels 0 and 1; the
pooler turns channel 1 into its unit 0, which the classifier reads with one weight and bias per label. Head 1, the
feed-forward layers and the classifier's other inputs stay random (seeded, scaled down), so
scores still vary a little from text to text and from seed to seed.
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

# The words that drive the scores (each one token of the vocabulary below).
TRIGGER_WORDS: tuple[str, ...] = ("stupid", "idiot", "hate", "kill", "from")

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
    """Writes a tiny detoxify checkpoint (BERT, 2 layers, width 32) and returns its path.

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
        vocab = _vocab()
        _set_trigger_path(model, [vocab.index(word) for word in TRIGGER_WORDS], classes)
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


# Each label's logit is _CLASSIFIER_GAIN * (about +1 flagged, -1 not) + its bias.
_LABEL_BIAS = {"toxic": 0.0, "toxicity": 0.0, "insult": -1.5, "obscene": -3.0}
_RARE_LABEL_BIAS = -5.0
_EMBED_TRIGGER = 8.0  # channel 0 of a trigger word's embedding
_MARGIN = 0.4  # channel 0 (normalised, about 5 for a trigger word) averaged over the tokens
_GAIN = 100.0  # the attention output's gain from that average into channel 1
_POOL_GAIN = 3.0
_CLASSIFIER_GAIN = 4.0
_NOISE = 0.2  # scale of the random weights left on the path's way (text-to-text variety)


def _set_trigger_path(model: object, trigger_ids: list[int], classes: tuple[str, ...]) -> None:
    """Sets, in place, the weights that make the trigger words drive the logits (module
    docstring); the rest stays as initialised (seeded), scaled down where it meets the path."""
    import torch

    bert = model.bert  # type: ignore[attr-defined]
    with torch.no_grad():
        embeddings = bert.embeddings
        for table in (
            embeddings.word_embeddings.weight,
            embeddings.position_embeddings.weight,
            embeddings.token_type_embeddings.weight,
        ):
            table[:, :2] = 0.0
            table[:, 2:] -= table[:, 2:].mean(dim=1, keepdim=True)
        words = embeddings.word_embeddings.weight
        words[trigger_ids, 0] = _EMBED_TRIGGER
        words[trigger_ids, 2:] -= _EMBED_TRIGGER / (words.shape[1] - 2)  # mean zero again
        embeddings.LayerNorm.weight.fill_(1.0)
        embeddings.LayerNorm.bias.zero_()

        head = bert.config.hidden_size // bert.config.num_attention_heads
        for index, layer in enumerate(bert.encoder.layer):
            attention = layer.attention
            dense = attention.output.dense
            dense.weight.mul_(_NOISE)
            dense.bias.mul_(_NOISE)
            layer.output.dense.weight.mul_(_NOISE)
            layer.output.dense.bias.mul_(_NOISE)
            for norm in (attention.output.LayerNorm, layer.output.LayerNorm):
                norm.weight.fill_(1.0)
                norm.bias.zero_()
            for out in (dense, layer.output.dense):  # nothing else writes channels 0 and 1
                out.weight[:2] = 0.0
                out.bias[:2] = 0.0
            if index == 0:
                query, key, value = attention.self.query, attention.self.key, attention.self.value
                for linear in (query, key):  # head 0 attends to every token alike
                    linear.weight[:head] = 0.0
                    linear.bias[:head] = 0.0
                value.weight[:head] = 0.0
                value.bias[:head] = 0.0
                value.weight[0, 0] = 1.0
                value.bias[0] = -_MARGIN
                dense.weight[:, :head] = 0.0  # head 0 writes channel 1 only
                dense.weight[1, 0] = _GAIN

        pooler = bert.pooler.dense
        pooler.weight[0] = 0.0
        pooler.weight[0, 1] = _POOL_GAIN
        pooler.bias[0] = 0.0
        classifier = model.classifier  # type: ignore[attr-defined]
        classifier.weight.mul_(_NOISE)
        classifier.weight[:, 0] = _CLASSIFIER_GAIN
        for i, name in enumerate(classes):
            classifier.bias[i] = _LABEL_BIAS.get(name, _RARE_LABEL_BIAS)
