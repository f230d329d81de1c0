"""A tiny, deterministic SentencePiece model for tests and local smoke runs.

It mirrors the layout of Gemma's tokenizer where it matters to the pipeline: pad 0, eos 1, bos 2,
unk 3, byte fallback, split digits, and the ``<start_of_turn>`` / ``<end_of_turn>`` chat pieces as
user-defined symbols. It is trained from a few dozen inline sentences, so it needs no data files.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import sentencepiece as spm

# Plain prose written for this file: news-like reports and short summaries, with some digits and
# punctuation so that split_digits and the punctuation pieces get exercised.
_SENTENCES: tuple[str, ...] = (
    "The city council voted 7 to 2 on Tuesday to expand the bus network by 2026.",
    "Officials said the new routes would serve about 40,000 riders every weekday.",
    "Summary: the council approved more buses, and most members supported the plan.",
    "A storm moved across the coast overnight, bringing heavy rain and strong winds.",
    "Forecasters expect the weather to clear by Friday, with temperatures near 18 degrees.",
    "In short, the storm caused flooding in low streets but no one was hurt.",
    "The local library reopened after a year of repairs to its roof and windows.",
    "Visitors can borrow up to 12 books at a time, and the reading room stays open late.",
    "Researchers reported that the river was cleaner than it had been in 30 years.",
    "They measured the water at 15 sites and found fewer harmful bacteria than before.",
    "The summary of the report is simple: careful work over many years made a difference.",
    "A small bakery on Main Street won a regional prize for its rye bread.",
    "The owner, who started the shop in 1998, said the secret is patience and good flour.",
    "Ticket sales for the summer festival rose by 25 percent compared with last year.",
    "Organizers plan to add a second stage and more food stands near the park entrance.",
    "Key points: more visitors, a bigger site, and longer hours on the final weekend.",
    "The school board released its budget, which sets aside $3.5 million for new teachers.",
    "Parents asked questions about class sizes, bus times, and the cost of school meals.",
    "According to the board, the average class will shrink from 28 to 24 students.",
    "A new bridge over the valley will open to traffic on 1 September, the state said.",
    "The project took four years and cost less than the first estimate of 90 million.",
    "Drivers should save about ten minutes on the trip between the two largest towns.",
    "In brief: the bridge is finished early, under budget, and ready for daily use.",
    "The hospital hired 60 nurses this spring to reduce waiting times in the emergency room.",
    "Patients now wait an average of 45 minutes, down from more than two hours in 2023.",
    "Farmers in the north expect a strong harvest after a mild and wet growing season.",
    "Prices for wheat and corn fell slightly, while the price of apples stayed the same.",
    "The museum will show a collection of old maps, letters, and photographs from the port.",
    "Each item tells part of the story of how trade shaped the town over 200 years.",
    "Experts warned that the old power lines need to be replaced within the next decade.",
    "The utility company said it would invest in cables, meters, and solar panels.",
    "Overall, the article explains why the grid must change and what that will cost.",
    "Volunteers planted 1,500 trees along the river to protect the banks from erosion.",
    "The group meets every Saturday morning and welcomes anyone who wants to help.",
    "A local team won the national final 3-1 after a tense second half on Sunday.",
    "Fans filled the streets to celebrate, and the mayor promised a parade next week.",
    "The main idea of the text is that the team worked hard and earned its victory.",
    "Scientists launched a weather balloon that reached a height of 33 kilometers.",
    "Data from the flight will help improve forecasts of storms and heat waves.",
    "The market opened higher on Monday as investors reacted to strong jobs numbers.",
    "Analysts noted that 250,000 new jobs were added, more than most had predicted.",
    "Question: what happened? Answer: the economy grew faster than expected this quarter.",
    "The airport will add 9 new gates and a faster security line before the holidays.",
    "Travelers are advised to arrive two hours early during the busy winter season.",
    "To summarize, the airport is growing, and passengers should plan their trips ahead.",
    "The town approved a plan to build 120 homes near the old railway station.",
    "Some residents worry about traffic, while others welcome more affordable housing.",
    "Write a short summary of the news above in one or two clear sentences.",
)


def _trainer_kwargs(vocab_size: int) -> dict[str, object]:
    return {
        "model_type": "bpe",
        "vocab_size": vocab_size,
        "character_coverage": 1.0,
        "byte_fallback": True,
        "split_digits": True,
        "user_defined_symbols": ["<start_of_turn>", "<end_of_turn>"],
        "pad_id": 0,
        "eos_id": 1,
        "bos_id": 2,
        "unk_id": 3,
        "pad_piece": "<pad>",
        "eos_piece": "<eos>",
        "bos_piece": "<bos>",
        "unk_piece": "<unk>",
        # Keep text as it is, like Gemma's tokenizer, so decode(encode(s)) == s.
        "normalization_rule_name": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "allow_whitespace_only_pieces": True,
        # Determinism: one thread and no sampling or shuffling of the input.
        "num_threads": 1,
        "shuffle_input_sentence": False,
        "input_sentence_size": 0,
        "minloglevel": 2,
    }


def train_tiny_tokenizer(path: str | os.PathLike[str], *, vocab_size: int = 512) -> Path:
    """Trains the tiny BPE model, writes it to ``path`` (parents created) and returns the path.

    The output is byte-for-byte the same on every run.
    """
    out = Path(path)
    spm.set_random_generator_seed(0)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES),
        model_writer=buffer,
        **_trainer_kwargs(vocab_size),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buffer.getvalue())
    return out


def widen_tokenizer(model: bytes, vocab_size: int, *, seed: int = 0) -> bytes:
    """``model`` (a serialized SentencePiece model) with synthetic pieces appended up to
    ``vocab_size`` (Gemma's 256,000 for benchmarks at the real vocabulary).

    The new pieces are distinct strings of 2-12 characters (letters, digits, JSON punctuation,
    half of them with the ``▁`` word marker), scored below every trained piece. Encoding may use
    them (BPE merges into any piece it holds); the point is a vocabulary of the real size for
    masks, samplers and grammar compilers.
    """
    import random

    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model)
    seen = {p.piece for p in proto.pieces}
    floor = min(p.score for p in proto.pieces) - 1.0
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + '{}[]":,. -_'
    while len(proto.pieces) < vocab_size:
        text = "".join(rng.choices(alphabet, k=rng.randint(2, 12)))
        piece = ("\u2581" + text) if rng.random() < 0.5 else text
        if piece in seen:
            continue
        seen.add(piece)
        new = proto.pieces.add()
        new.piece, new.score, new.type = piece, floor - len(proto.pieces) * 1e-6, new.NORMAL
    return proto.SerializeToString()
