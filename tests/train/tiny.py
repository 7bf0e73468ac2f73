"""The tiny LM and training configs the tests under tests/train share."""

from moekit.config import LMConfig, MoEConfig, TrainConfig


def tiny_cfgs(steps=12, **train_kw):
    model = LMConfig(
        vocab_size=257,
        dim=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=64,
        moe=MoEConfig(dim=32, hidden_dim=32, num_experts=4, top_k=2),
    )
    train = TrainConfig(
        steps=steps,
        batch_size=4,
        seq_len=32,
        eval_every=6,
        eval_windows=8,
        tokenizer="bytes",
        code_chars=60_000,
        checkpoint_every=5,
        warmup_steps=2,
        **train_kw,
    )
    return model, train
