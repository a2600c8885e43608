"""Fixtures for the inference tests: a random tiny model and a byte-level stand-in tokenizer."""
import pytest
import torch

from dsmoe import ModelArgs, Transformer


class ByteTokenizer:
    """Bytes 0..255 are tokens 0..255; 256 is BOS and 257 EOS. Enough to test text handling."""
    bos_id, eos_id = 256, 257

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids, skip_special: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight over a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_args() -> ModelArgs:
    return ModelArgs.from_preset("tiny")


@pytest.fixture
def tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


def seeded_model(args: ModelArgs, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args).eval()


@pytest.fixture
def build():
    """A freshly initialised model in eval mode, reproducible by seed."""
    return seeded_model


@pytest.fixture
def agreeing_model():
    return make_agreeing_model


@torch.no_grad()
def make_agreeing_model(args: ModelArgs, mix: float, seed: int = 0) -> Transformer:
    """A random model whose MTP draft mostly agrees with it, built without training.

    Every block's output projections are scaled by `mix`, so the model mostly maps the
    current token to a fixed next token f(t), nudged by context; the MTP module reads only
    the embedding of t_{i+1} (eh_proj = [I, 0]), so it drafts about f(t_{i+1}), which is
    the model's own next prediction. Smaller `mix`, more agreement: speculative tests then
    exercise acceptance and rejection both.
    """
    model = seeded_model(args, seed)
    blocks = list(model.layers) + [m.block for m in model.mtp]
    for block in blocks:
        block.attn.wo.weight.mul_(mix)
        ffn = block.ffn
        if block.is_moe:
            ffn.experts.w2_EDF.mul_(mix)
            if ffn.shared_experts is not None:
                ffn.shared_experts.w2.weight.mul_(mix)
        else:
            ffn.w2.weight.mul_(mix)
    D = args.dim
    for module in model.mtp:
        module.eh_proj.weight.zero_()
        module.eh_proj.weight[:, :D] = torch.eye(D)
    return model
