"""hyperdecoder_bart in-process, on the tiny arch (CPU): init, counts, generated weights, beam search."""

import math

import pytest
import torch
from fairseq import options
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.bart.model import BARTModel
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks.translation import TranslationTask

import hyperdecoder_src  # noqa: F401  (registers the model)
from hyperdecoder_src.models.adapters import AdapterHypernetwork, BottleneckAdapter
from hyperdecoder_src.models.hyperdecoder_bart import POOLED_KEY, HyperdecoderBARTModel, HyperdecoderDecoder

torch.set_num_threads(1)

TINY_BART = [
    "--encoder-layers",
    "2",
    "--decoder-layers",
    "2",
    "--encoder-embed-dim",
    "64",
    "--encoder-ffn-embed-dim",
    "128",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
    "--max-source-positions",
    "128",
    "--max-target-positions",
    "128",
]


def make_dictionary(n=40):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def build(arch="hyperdecoder_bart_tiny", *extra, seed=0, dictionary=None):
    torch.manual_seed(seed)
    argv = [
        "unused-data",
        "--task",
        "translation",
        "-s",
        "src",
        "-t",
        "tgt",
        "--arch",
        arch,
        "--cpu",
        "--dropout",
        "0",
        *map(str, extra),
    ]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    cfg = convert_namespace_to_omegaconf(args)
    d = dictionary or make_dictionary()
    task = TranslationTask(cfg.task, d, d)
    model = task.build_model(cfg.model)
    model.eval()
    return model, task, d


def sources(d, rows, pad_to=None):
    """Right-padded? No: fairseq's translation batches left-pad sources; do the same."""
    width = pad_to or max(len(r) for r in rows) + 1
    out = torch.full((len(rows), width), d.pad(), dtype=torch.long)
    for i, r in enumerate(rows):
        toks = [d.index(f"w{t}") for t in r] + [d.eos()]
        out[i, width - len(toks) :] = torch.tensor(toks)
    lengths = out.ne(d.pad()).sum(1)
    return out, lengths


def make_adapters_matter(model, scale=3000.0):
    """Scale the generator heads (init ~1e-3 of fan-in) so generated adapters change the outputs."""
    with torch.no_grad():
        gen = model.decoder.param_gen
        for head in (gen.weight_down, gen.weight_up, gen.bias_up):
            head.weight.mul_(scale)


def test_adapter_init_survives_bert_init():
    model, _, _ = build()
    adapters = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    assert len(adapters) == 2  # one per encoder layer, none in the decoder (generated there)
    for a in adapters:
        for lin in (a.down, a.up):
            fan_in, fan_out = lin.weight.shape[1], lin.weight.shape[0]
            bound = 1e-4 * math.sqrt(6.0 / (fan_in + fan_out))
            assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > bound / 10
            assert torch.count_nonzero(lin.bias) == 0
    gen = model.decoder.param_gen
    hb = gen.linear1.out_features
    for head, fan_in in ((gen.weight_down, 64), (gen.weight_up, 8)):
        bound = 1e-3 * math.sqrt(3.0 / (hb * fan_in))
        assert head.weight.abs().max() <= bound and head.weight.abs().max() > bound / 2
        assert torch.count_nonzero(head.bias) == 0
    # init_bert_params would have given N(0, 0.02) to linear1: PyTorch's default is U(+-1/sqrt(fan_in))
    assert gen.linear1.weight.abs().max() > 0.1
    assert torch.count_nonzero(gen.linear1.bias) > 0


def test_parameter_counts_match_formula():
    model, _, _ = build()
    c = model.parameter_counts()
    C, a, hb, le, L = 64, 8, 16, 10, 2
    enc_adapters = L * (2 * C * a + a + C)
    generator = AdapterHypernetwork.num_params(L, C, C, a, hb, le)
    # independent count of the generator from its definition
    assert generator == L * le + (C + le) * hb + hb + (hb * C * a + C * a) * 2 + (hb * a + a) + (hb * C + C)
    mlp = 2 * (C * C + C)
    assert c["encoder_adapters"] == enc_adapters
    assert c["decoder_generator"] == generator + mlp
    assert c["decoder_adapters"] == 0 and c["encoder_generator"] == 0
    assert c["trainable"] == enc_adapters + generator + mlp
    plain, _, _ = build("bart_base", *TINY_BART)
    assert c["total"] == sum(p.numel() for p in plain.parameters()) + c["trainable"]
    # reference figures (spec section 1): T5-large stack, 24 layers, d 1024, a 64, hb 128
    assert AdapterHypernetwork.num_params(24, 1024, 1024, 64, 128, 10) == 17_181_360


def test_unfreeze_flags():
    model, _, _ = build("hyperdecoder_bart_tiny", "--unfreeze-decoder")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "decoder.layers.0.fc1.weight" in trainable and "encoder.layers.0.fc1.weight" not in trainable
    model, _, _ = build("hyperdecoder_bart_tiny", "--no-freeze-backbone")
    assert all(p.requires_grad for p in model.parameters())


def test_bad_flags_name_the_flag():
    with pytest.raises(ValueError, match="--decoder-adapter-dim"):
        build("hyperdecoder_bart_tiny", "--decoder-adapter-dim", "0")
    with pytest.raises(ValueError, match="--checkpoint-activations"):
        build("hyperdecoder_bart_tiny", "--checkpoint-activations")


def test_generated_weights_per_instance():
    model, _, d = build()
    src, lengths = sources(d, [[1, 2, 3, 4], [7, 8, 9], [1, 2, 3, 4]], pad_to=8)
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        w_down, b_down, w_up, b_up = model.decoder.generate_adapter_weights(enc)
    assert w_down.shape == (3, 2, 64, 8) and w_up.shape == (3, 2, 8, 64)
    assert b_down.shape == (3, 2, 8) and b_up.shape == (3, 2, 64)
    for w in (w_down, b_down, w_up, b_up):
        assert not torch.allclose(w[0], w[1])  # different inputs -> different adapters
        torch.testing.assert_close(w[0], w[2], rtol=0, atol=1e-6)  # identical inputs -> identical
        assert not torch.allclose(w[:, 0], w[:, 1])  # layer embedding -> different layers
    # pooling ignores padding: the same sentence alone (no pads) gets the same weights
    alone, alone_len = sources(d, [[7, 8, 9]])
    with torch.no_grad():
        w_alone = model.decoder.generate_adapter_weights(model.encoder(alone, src_lengths=alone_len))[0]
    torch.testing.assert_close(w_alone[0], w_down[1], rtol=1e-5, atol=1e-7)
    # the pooled vector is the masked mean of the final encoder output
    out, mask = enc["encoder_out"][0], enc["encoder_padding_mask"][0]
    expected = torch.stack([out[~mask[i], i].mean(0) for i in range(3)])
    torch.testing.assert_close(enc[POOLED_KEY][0], expected)


def test_generated_adapters_change_decoder_and_get_gradients():
    model, _, d = build()
    make_adapters_matter(model)
    model.train()
    src, lengths = sources(d, [[1, 2, 3, 4], [7, 8, 9]])
    prev = torch.tensor([[d.eos(), d.index("w5"), d.index("w6")]] * 2)
    out, _ = model(src, lengths, prev)
    out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    dead = [n for n, g in grads.items() if g is None or torch.count_nonzero(g) == 0]
    assert not dead, f"trainable parameters without gradient: {dead}"
    frozen_with_grad = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_with_grad


def test_generated_encoder_runs_two_passes():
    model, _, d = build("hyperdecoder_bart_tiny", "--encoder-adapter", "generated")
    calls = []
    model.encoder.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    src, lengths = sources(d, [[1, 2, 3], [4, 5, 6, 7]])
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
    assert len(calls) == 2
    assert model.parameter_counts()["encoder_generator"] > 0
    # pass 2 uses generated weights: scaling its generator changes the output, not pass 1's adapters
    with torch.no_grad():
        for head in (model.encoder.param_gen.weight_down, model.encoder.param_gen.weight_up):
            head.weight.mul_(1000)
        enc2 = model.encoder(src, src_lengths=lengths)
    assert not torch.allclose(enc["encoder_out"][0], enc2["encoder_out"][0])


def test_reorder_encoder_out_keeps_pooled_vector():
    model, _, d = build()
    src, lengths = sources(d, [[1, 2, 3], [4, 5, 6, 7], [9, 9]])
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
    order = torch.tensor([2, 2, 0, 1])
    new = model.encoder.reorder_encoder_out(enc, order)
    torch.testing.assert_close(new[POOLED_KEY][0], enc[POOLED_KEY][0][order])


def _generate(model, d, rows, beam, pad_to=None):
    src, lengths = sources(d, rows, pad_to)
    gen = SequenceGenerator([model], d, beam_size=beam, max_len_a=0, max_len_b=12, min_len=1)
    sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}, "id": torch.arange(len(rows))}
    with torch.no_grad():
        hyps = gen.generate([model], sample)
    return [[(h["tokens"].tolist(), round(float(h["score"]), 4)) for h in per_src] for per_src in hyps]


@pytest.fixture(scope="module")
def beam_model():
    model, _, d = build(seed=3)
    make_adapters_matter(model)
    with torch.no_grad():  # make EOS likely enough that sentences finish at different steps
        model.decoder.embed_tokens.weight[d.eos()] *= 2.5
    return model, d


BEAM_ROWS = [[1, 2, 3, 4, 5], [30, 31], [7, 8, 9, 10], [11, 3], [20, 21, 22, 23, 24, 25], [5, 4]]


def test_beam_batch_equals_each_alone(beam_model):
    model, d = beam_model
    batched = _generate(model, d, BEAM_ROWS, beam=4)
    alone = [_generate(model, d, [row], beam=4)[0] for row in BEAM_ROWS]
    assert batched == alone
    # the test exercises sentences finishing at different steps (the case BART's quirk breaks)
    assert len({len(h[0][0]) for h in batched}) > 1
    # and different instances decode differently
    assert len({tuple(h[0][0]) for h in batched}) > 1


def test_beam_test_detects_a_wrong_row_mapping(beam_model, monkeypatch):
    """Negative control: without following beam reordering, batched != alone (the test can fail)."""
    model, d = beam_model

    def keep_row_positions(self, state, new_order):  # the bug: rows keep their old instance by position
        cached = self.get_incremental_state(state, self.CACHE_KEY)
        cached["rows"] = cached["rows"][: new_order.numel()]

    monkeypatch.setattr(HyperdecoderDecoder, "reorder_incremental_state", keep_row_positions)
    batched = _generate(model, d, BEAM_ROWS, beam=4)
    monkeypatch.undo()
    alone = [_generate(model, d, [row], beam=4)[0] for row in BEAM_ROWS]
    assert batched != alone


def test_weights_generated_once_per_source(beam_model, monkeypatch):
    model, d = beam_model
    calls = []
    original = HyperdecoderDecoder.generate_adapter_weights

    def counting(self, encoder_out):
        w = original(self, encoder_out)
        calls.append(w[0].size(0))
        return w

    monkeypatch.setattr(HyperdecoderDecoder, "generate_adapter_weights", counting)
    _generate(model, d, BEAM_ROWS, beam=4)
    assert calls == [len(BEAM_ROWS)]  # one call, one row per source (not per beam, not per step)


def test_warm_start_from_plain_bart_state_dict():
    plain, _, d = build("bart_base", *TINY_BART, seed=5)
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    model, _, _ = build(seed=6, dictionary=d)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(dict(state), strict=True)
    loaded = model.state_dict()
    new_keys = set(loaded) - set(state)
    assert new_keys and all((".adapter." in k) or ("param_gen." in k) or ("mlp." in k) for k in new_keys)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
    for k in new_keys:
        assert torch.equal(loaded[k], fresh[k]), k
    # every backbone key is still loaded strictly
    broken = dict(state)
    del broken["decoder.layers.1.fc2.weight"]
    with pytest.raises(RuntimeError, match="decoder.layers.1.fc2.weight"):
        model.load_state_dict(broken, strict=True)
    assert isinstance(plain, BARTModel) and isinstance(model, HyperdecoderBARTModel)
