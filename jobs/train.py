"""`blipbatch train-demo`: train the small InstructBLIP of jobs/demo_data/shapes-instructblip on synthetic shapes.

Everything comes from a seed: the tokenizers are trained (with the `tokenizers` library) on the instructions and
answers of jobs.shapes, the model (our model/ classes, a LLaMA-style language model) starts from a seeded
initialisation, and every step draws fresh pictures from `shapes.samples(seed)`. The pictures of a batch are asked
the four instructions in the turns of ASKED, so the model has to read the instruction to know which answer is
wanted. The loss is `forward(..., labels=...)`'s: the answer and its end-of-sequence token are the targets; the
image placeholders, the prompt and the padding are masked with -100. The folder it writes is the Hub layout that
both our model/ and transformers load.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch

from blipbatch.jobs import shapes
from blipbatch.jobs.tokenizer_files import write_processor_files
from blipbatch.model import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

IMAGE_SIZE = shapes.INPUT_SIZE
NUM_QUERY_TOKENS = 8
# A seed no training run uses by default: the pictures accuracy is measured on.
EVAL_SEED = 1_000_003
# The seed of the held-out generator's pictures (shapes.held_out_samples), which no training run sees.
HELD_OUT_SEED = 0
IGNORE = -100  # label of positions that are not targets (transformers' ignore index)
# Which instruction (an index into shapes.INSTRUCTIONS) picture i of a batch is asked: ASKED[i % 8]. Half the rows
# are captions, which name count, colour and shape, a quarter counts, an eighth each colour and shape: counting is
# what this small model learns last, so it gets the most rows.
ASKED = (0, 3, 0, 2, 0, 3, 0, 1)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 9000
    batch_images: int = 64  # pictures per step, one row each
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0
    threads: int = 2  # torch threads: the run is meant to take minutes on a 2-core machine


@dataclass(frozen=True)
class TrainResult:
    folder: Path
    seconds: float  # wall-clock time of the training loop (tokenizers, model building and saving excluded)
    first_loss: float  # mean loss of the first and of the last 50 steps (or fewer in a short run)
    last_loss: float


def model_config(
    vocab_size: int, qformer_vocab_size: int, bos: int, eos: int, pad: int, image_token: int
) -> InstructBlipConfig:
    """The model's shape: about 0.4M parameters, 64 wide everywhere, 64x64 pictures in 8x8 patches."""
    return InstructBlipConfig.from_dict(
        dict(
            vision_config=dict(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=3,
                num_attention_heads=4,
                image_size=IMAGE_SIZE,
                patch_size=8,
            ),
            qformer_config=dict(
                vocab_size=qformer_vocab_size,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                cross_attention_frequency=1,
                max_position_embeddings=128,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            ),
            text_config=dict(
                model_type="llama",
                vocab_size=vocab_size,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=256,
                bos_token_id=bos,
                eos_token_id=eos,
                pad_token_id=pad,
            ),
            num_query_tokens=NUM_QUERY_TOKENS,
            image_token_index=image_token,
        )
    )


def init_weights_(model: InstructBlipForConditionalGeneration, seed: int, std: float = 0.02) -> None:
    """A start that trains at this small width: Linear and the patch Conv2d N(0, 1/fan_in) (at width 64 the usual
    0.02 shrinks every layer's output six-fold, and the image path then learns colour only), embedding tables,
    query tokens and the vision tower's class and position embeddings N(0, std), biases 0, norm scales 1."""
    generator = torch.Generator().manual_seed(seed)

    def normal_(param: torch.Tensor, scale: float) -> None:
        param.copy_(torch.randn(param.shape, generator=generator) * scale)

    with torch.no_grad():
        for name, param in model.named_parameters():
            module = model.get_submodule(name.rpartition(".")[0])
            if name.endswith("bias"):
                param.zero_()
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                normal_(param, param[0].numel() ** -0.5)
            elif "norm" in name.lower():
                param.fill_(1.0)
            else:
                normal_(param, std)
        # the Q-Former's padding row stays zero, as nn.Embedding(padding_idx=...) makes it
        pad = model.config.qformer_config.pad_token_id
        if pad is not None:
            model.qformer.embeddings.word_embeddings.weight[pad].zero_()


class Batcher:
    """Training rows for pictures, picture i asked instruction ASKED[i % 8], laid out as forward() takes them.

    LM row: [<image> x Q][BOS instruction][answer EOS][PAD...], padded on the right, so positions count from the
    first token as they do in generate() (which skips left padding). Labels: the answer and EOS only."""

    def __init__(self, processor: InstructBlipProcessor) -> None:
        self.processor = processor
        self.instructions = shapes.INSTRUCTIONS
        self.prompt_ids = {t: processor.encode_prompts([t])["input_ids"][0].tolist() for t in self.instructions}
        self.qformer = processor.encode_prompts(list(self.instructions))  # a row per instruction, padded alike
        pad, eos = processor.tokenizer.pad_token_id, processor.tokenizer.eos_token_id
        if pad is None or eos is None:
            raise ValueError("training needs a tokenizer with padding and end-of-sequence tokens")
        self.pad, self.eos = pad, eos

    def __call__(self, samples: Sequence[shapes.ShapeSample]) -> dict[str, torch.Tensor]:
        pixel_values = self.processor.image_processor([s.image for s in samples])
        asked = [ASKED[i % len(ASKED)] for i in range(len(samples))]
        rows, labels = [], []
        for sample, which in zip(samples, asked):
            text = self.instructions[which]
            prompt = self.prompt_ids[text]
            answer = sample.scene.targets()[text]
            target = self.processor.tokenizer.encode(answer, add_special_tokens=False) + [self.eos]
            rows.append(prompt + target)
            labels.append([IGNORE] * len(prompt) + target)
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([r + [IGNORE] * (width - len(r)) for r in labels])
        asked_rows = torch.tensor(asked)
        return {
            "pixel_values": pixel_values,
            "qformer_input_ids": self.qformer["qformer_input_ids"][asked_rows],
            "qformer_attention_mask": self.qformer["qformer_attention_mask"][asked_rows],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": label_ids,
        }


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero, so the last steps' noise does not stay in the weights."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def build(seed: int) -> tuple[InstructBlipForConditionalGeneration, InstructBlipProcessor]:
    """Tokenizers trained on the shapes corpus, the processor read back from its files, and a fresh model."""
    with tempfile.TemporaryDirectory() as tmp:
        infos = write_processor_files(
            Path(tmp), lm="llama", num_query_tokens=NUM_QUERY_TOKENS, image_size=IMAGE_SIZE, corpus=shapes.corpus()
        )
        processor = InstructBlipProcessor.from_pretrained(tmp)
    lm, qformer = infos["tokenizer"], infos["qformer_tokenizer"]
    if lm.bos_token_id is None or lm.eos_token_id is None or lm.image_token_id is None:
        raise ValueError("the language model's tokenizer lacks a BOS, EOS or <image> token")
    config = model_config(
        lm.vocab_size, qformer.vocab_size, lm.bos_token_id, lm.eos_token_id, lm.pad_token_id, lm.image_token_id
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config)
    init_weights_(model, seed)
    return model, processor


def train(folder: str | Path, config: TrainConfig = TrainConfig(), log: Callable[[str], None] = print) -> TrainResult:
    """Train from `config.seed` and save the model and its processor to `folder` (Hub layout)."""
    folder = Path(folder)
    torch.set_num_threads(config.threads)
    model, processor = build(config.seed)
    model.train()
    batcher = Batcher(processor)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n != "query_tokens"]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n == "query_tokens"]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    stream = shapes.samples(config.seed)
    losses: list[float] = []
    start = time.monotonic()
    for step in range(config.steps):
        batch = batcher([next(stream) for _ in range(config.batch_images)])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            recent = losses[-100:]
            log(
                f"step {step + 1}/{config.steps}  loss {sum(recent) / len(recent):.4f}  {time.monotonic() - start:.0f}s"
            )
    seconds = time.monotonic() - start
    model.eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    window = min(50, max(1, len(losses) // 2))
    return TrainResult(folder, seconds, sum(losses[:window]) / window, sum(losses[-window:]) / window)


def evaluate(
    folder: str | Path, count: int = 200, seed: int = EVAL_SEED, held_out: bool = False, max_new_tokens: int = 6
) -> dict[str, float]:
    """`accuracy` on `count` fresh pictures of the training generator, or with `held_out` of the held-out one."""
    return accuracy(folder, shapes.make_dataset(count, seed, held_out=held_out), max_new_tokens=max_new_tokens)


@torch.inference_mode()
def accuracy(
    folder: str | Path, data: Sequence[shapes.ShapeSample], batch_size: int = 50, max_new_tokens: int = 6
) -> dict[str, float]:
    """Accuracy of a checkpoint on `data` through model/'s API (greedy decoding): the share of pictures whose
    answer to each question is right, and whose caption names the right count, colour and shape."""
    processor = InstructBlipProcessor.from_pretrained(folder)
    model = InstructBlipForConditionalGeneration.from_pretrained(folder)
    count = len(data)
    right = dict.fromkeys([*shapes.QUESTIONS, "caption"], 0)
    for first in range(0, count, batch_size):
        chunk = data[first : first + batch_size]
        for key, text in [*shapes.QUESTIONS.items(), ("caption", shapes.CAPTION_PROMPT)]:
            inputs = processor(images=[s.image for s in chunk], text=text)
            # the ids: no return_dict_in_generate
            ids = cast(torch.Tensor, model.generate(**inputs, max_new_tokens=max_new_tokens))
            answers = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for sample, answer in zip(chunk, answers):
                if key == "caption":
                    right[key] += shapes.parse_caption(answer) == sample.scene
                else:
                    right[key] += answer.strip() == sample.scene.answers[key]
    return {key: n / count for key, n in right.items()}


def main_train(output: str, steps: int | None, seed: int, evaluate_count: int) -> int:
    config = TrainConfig(seed=seed) if steps is None else TrainConfig(steps=steps, seed=seed)
    print(f"training {config} -> {output}", flush=True)
    result = train(output, config, log=lambda line: print(line, flush=True))
    print(
        f"trained in {result.seconds:.0f}s (loss {result.first_loss:.3f} -> {result.last_loss:.3f}); "
        f"saved to {result.folder}"
    )
    if evaluate_count:
        for what, seed, held_out in (("new", EVAL_SEED, False), ("held-out generator", HELD_OUT_SEED, True)):
            scores = evaluate(output, count=evaluate_count, seed=seed, held_out=held_out)
            print(
                f"accuracy on {evaluate_count} {what} pictures (seed {seed}): "
                + ", ".join(f"{k} {v:.1%}" for k, v in scores.items()),
                flush=True,
            )
    return 0
