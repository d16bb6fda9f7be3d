"""Distributed ITC: two CPU processes (gloo) equal one process on the concatenated batch.

Each process encodes its local slice with the tiny X-VLM, computes the ITC loss with the features of both processes
(`gather_with_grad`), back-propagates and averages the gradients over processes (what DDP does). The result must
equal the loss and gradients of one process on the concatenated batch. With `official_gradient_scaling=True` the
gradients that flow through the gathered features are 1/world_size of that (the official `AllGather`), while the
temperature's is not.

The same holds for streamed pre-training (`xvlm-train pretrain --streaming`): two processes read disjoint batches of
the stream; ITC covers both, ITM draws its hard negatives from each process's own batch (official).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _setup():
    from modeling_xvlm import XVLMConfig, XVLMModel

    torch.manual_seed(0)
    config = XVLMConfig.from_preset("tiny", text_config={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = XVLMModel(config).eval()  # eval: no dropout; gradients are still computed
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(5, 3, 64, 64, generator=g)
    input_ids = torch.randint(5, 128, (5, 6), generator=g)
    input_ids[:, 0] = 2
    image_ids = torch.tensor([0, 1, 1, 2, 0])  # repeated ids across the two processes: soft targets
    return model, pixel_values, input_ids, image_ids


def _itc(model, pixel_values, input_ids, image_ids, **kwargs):
    from modeling_xvlm.losses import image_text_contrastive_loss

    image = model.get_image_features(pixel_values).pooler_output
    text = model.get_text_features(input_ids).pooler_output
    return image_text_contrastive_loss(image, text, model.temp, image_ids, **kwargs)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case, rows, kwargs in (
            ("default", [slice(0, 3), slice(3, 5)], {}),  # unequal local batches (3 and 2)
            ("equal", [slice(0, 2), slice(2, 4)], {}),
            ("official", [slice(0, 2), slice(2, 4)], {"official_gradient_scaling": True}),
        ):
            model, pixel_values, input_ids, image_ids = _setup()
            local = rows[rank]
            loss = _itc(model, pixel_values[local], input_ids[local], image_ids[local], **kwargs)
            loss.backward()
            grads = _grads(model)
            for grad in grads.values():  # DDP: average over processes
                dist.all_reduce(grad)
                grad /= WORLD
            results[case] = {"loss": loss.detach(), "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(n_rows: int) -> dict:
    model, pixel_values, input_ids, image_ids = _setup()
    loss = _itc(model, pixel_values[:n_rows], input_ids[:n_rows], image_ids[:n_rows], gather=False)
    loss.backward()
    return {"loss": loss.detach(), "grads": _grads(model)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_processes_equal_one_process_on_the_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]

    for case, n_rows in (("default", 5), ("equal", 4)):
        ref = _reference(n_rows)
        for result in ranks:
            assert torch.allclose(result[case]["loss"], ref["loss"], atol=1e-6), case
        grads = ranks[0][case]["grads"]
        assert set(grads) == set(ref["grads"])
        for name, grad in grads.items():
            assert torch.allclose(grad, ref["grads"][name], atol=1e-5, rtol=1e-3), (case, name)

    # Official AllGather: every gradient that flows through the gathered features is 1/world_size too small.
    ref = _reference(4)
    grads = ranks[0]["official"]["grads"]
    assert torch.allclose(ranks[0]["official"]["loss"], ref["loss"], atol=1e-6)
    assert torch.allclose(grads["temp"], ref["grads"]["temp"], atol=1e-5, rtol=1e-3)
    for name, grad in grads.items():
        if name != "temp":
            assert torch.allclose(grad, ref["grads"][name] / WORLD, atol=1e-5, rtol=1e-3), name


# ---------------------------------------------------------------------------------------------------------------
# The same exactness on streamed pre-training batches (`xvlm-train pretrain --streaming`)
# ---------------------------------------------------------------------------------------------------------------


def _streamed_setup(dataset: str, rank: int) -> tuple[torch.nn.Module, dict[str, dict]]:
    """The pre-training model of `xvlm-train pretrain --streaming` and the first image-text and region batch of
    process `rank` of `WORLD`, built as the training loop builds them (its collators, streams and batch seeds)."""
    from modeling_xvlm.training.recipe import get_recipe
    from modeling_xvlm.training.streaming import StreamingBatches, open_pretrain_stream
    from modeling_xvlm.training.train import TrainConfig, _model_and_processor, build_task_data

    cfg = TrainConfig(task="pretrain", streaming=True, dataset=dataset, tokenizer="synthetic", batch_size=3,
                      region_max_images=2, region_batch_texts=4, shuffle_buffer=4, max_steps=1, seed=5)
    torch.manual_seed(cfg.seed)
    model, processor = _model_and_processor(cfg)
    data = build_task_data(cfg, processor, model.config.image_size, get_recipe("pretrain", batch_size=3))
    batches = {}
    for stream, collator, adapter, size in (("image", data.image_collator, data.image_adapter, 3),
                                            ("region", data.region_collator, data.region_adapter, 2)):
        rows = open_pretrain_stream(dataset, "train", rank, WORLD, cfg.seed, cfg.shuffle_buffer, stream)
        batches[stream] = next(StreamingBatches(rows, collator, size, cfg.seed, stream, rank, adapter))
    return model.eval(), batches  # eval: no dropout, so that the reference draws the same hard negatives


def _streamed_worker(rank: int, init_file: str, dataset: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, batches = _streamed_setup(dataset, rank)
        results = {}
        for stream, batch in batches.items():
            model.zero_grad()
            torch.manual_seed(10 + rank)  # the hard negatives' draw
            output = model(**batch)
            output.loss.backward()
            grads = _grads(model)
            for grad in grads.values():
                dist.all_reduce(grad)
                grad /= WORLD
            results[stream] = {"batch": dict(batch), "loss_itc": output.loss_itc.detach(),
                               "loss_itm": output.loss_itm.detach(), "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _streamed_reference(dataset: str, ranks: list[dict], stream: str) -> tuple[dict, torch.Tensor, list]:
    """One process: ITC over both processes' batches together, every other loss on each process's own batch (ITM
    hard negatives from the local similarities, as the official code), averaged over processes as DDP does."""
    from modeling_xvlm.losses import image_text_contrastive_loss

    model, _ = _streamed_setup(dataset, 0)
    weight = model.config.itc_loss_weight
    outputs, groups, local_parts = [], [], []
    for rank, result in enumerate(ranks):
        batch = result[stream]["batch"]
        torch.manual_seed(10 + rank)
        output = model(**batch)
        outputs.append(output)
        index = batch.get("image_index")
        index = torch.arange(batch["input_ids"].shape[0]) if index is None else index
        groups.append(model._visual_groups(index, batch.get("region_masks")) + (rank << 32))
        local_parts.append(output.loss - weight * output.loss_itc)
    itc = image_text_contrastive_loss(torch.cat([o.image_embeds for o in outputs]),
                                      torch.cat([o.text_embeds for o in outputs]), model.xvlm.temp,
                                      torch.cat(groups), gather=False)
    (weight * itc + sum(local_parts) / WORLD).backward()
    return _grads(model), itc.detach(), [o.loss_itm.detach() for o in outputs]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_streamed_pretraining_losses_across_two_processes_are_exact(tmp_path):
    """Two processes stream disjoint pre-training batches (image-text and region): each one's ITC loss is the loss
    of both batches together, its ITM loss is that of its own batch with its own hard negatives, and the averaged
    gradients equal one process's gradient of that total."""
    from modeling_xvlm.data import SyntheticConfig, write_synthetic_dataset

    dataset = str(tmp_path / "data")
    write_synthetic_dataset(dataset, SyntheticConfig(num_train=12, num_validation=2, num_test=2), overwrite=True,
                            splits=("train",))
    init_file = str(tmp_path / "init")
    mp.spawn(_streamed_worker, args=(init_file, dataset, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    for stream in ("image", "region"):
        pixels = [result[stream]["batch"]["pixel_values"] for result in ranks]
        assert pixels[0].shape == pixels[1].shape and not torch.equal(pixels[0], pixels[1]), stream
        grads, itc, itm = _streamed_reference(dataset, ranks, stream)
        for rank, result in enumerate(ranks):
            assert torch.allclose(result[stream]["loss_itc"], itc, atol=1e-6), (stream, rank)
            assert torch.allclose(result[stream]["loss_itm"], itm[rank], atol=1e-6), (stream, rank)
        assert set(ranks[0][stream]["grads"]) == set(grads)
        for name, grad in ranks[0][stream]["grads"].items():
            assert torch.allclose(grad, grads[name], atol=1e-5, rtol=1e-3), (stream, name)
