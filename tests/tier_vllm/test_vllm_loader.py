"""The vLLM tier (`make test-vllm`, its own venv with vllm 0.33.0): VLLMLayout against the real
vLLM. vLLM builds its own model classes on this CPU-only machine (VLLM_TARGET_DEVICE=cpu) at
tp 1, 2, 4 over gloo; on every rank, after vLLM's own `load_weights`, its parameters equal
`VLLMLayout.shard`, and the Resharder writing into that live model's parameters in place (from a
Megatron layout, colocated: the Megatron rank's process is vLLM rank 0's) gives the same tensors."""

import os
import socket

import pytest
import torch

from rlhfkern.reshard import MegatronLayout, ModelSpec, Resharder, VLLMLayout, plan_reshard


def config():
    from transformers import Qwen2Config

    # GQA 8/2 (tp 4 replicates KV heads), Qwen2 biases, vocab not a multiple of 64
    return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                       num_key_value_heads=2, vocab_size=1000, max_position_embeddings=128, tie_word_embeddings=False)


def _worker(rank, tp, model_dir, port, failures):
    os.environ.update(VLLM_TARGET_DEVICE="cpu", HF_HUB_OFFLINE="1", VLLM_HOST_IP="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
    try:
        from transformers import AutoModelForCausalLM
        from vllm.config import DeviceConfig, LoadConfig, ModelConfig, ParallelConfig, VllmConfig, set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.model_executor.model_loader.utils import initialize_model

        cfg = config()
        torch.manual_seed(0)
        hf = {k: v.detach() for k, v in AutoModelForCausalLM.from_config(cfg).named_parameters()}
        spec = ModelSpec.from_hf_config(cfg)
        vc = VllmConfig(model_config=ModelConfig(model=model_dir, tokenizer=model_dir, skip_tokenizer_init=True,
                                                 dtype="float32", max_model_len=128, enforce_eager=True),
                        device_config=DeviceConfig(device="cpu"),
                        parallel_config=ParallelConfig(tensor_parallel_size=tp),
                        load_config=LoadConfig(load_format="dummy"))
        with set_current_vllm_config(vc):
            init_distributed_environment(world_size=tp, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         local_rank=rank, backend="gloo")
            initialize_model_parallel(tensor_model_parallel_size=tp)
            with torch.device("cpu"):
                model = initialize_model(vc)
            params = dict(model.named_parameters())
            for p in params.values():  # what the loader does not write stays nan
                p.data.fill_(float("nan"))
            model.load_weights(iter(hf.items()))
            ours = VLLMLayout(spec, tp).shard(hf)[rank]
            assert sorted(params) == sorted(ours), (sorted(params), sorted(ours))
            for name, t in ours.items():
                torch.testing.assert_close(params[name].data, t, rtol=0, atol=0, msg=f"rank {rank} {name}")
            loaded = {n: p.data.clone() for n, p in params.items()}
            # the writer: the Resharder puts a plan's output straight into the live parameters
            for p in params.values():
                p.data.fill_(float("nan"))
            src = MegatronLayout(spec, 1, 1)
            plan = plan_reshard(src, VLLMLayout(spec, tp), colocated=True, dtype=torch.float32)
            Resharder(plan, bucket_bytes=1 << 14).run({0: src.shard(hf)[0]} if rank == 0 else {},
                                                      {rank: {n: p.data for n, p in params.items()}})
            for name, t in loaded.items():
                torch.testing.assert_close(params[name].data, t, rtol=0, atol=0, msg=f"rank {rank} {name} written")
    except Exception as e:  # reported to the parent, which fails the test
        failures.put(f"rank {rank}: {type(e).__name__}: {e}")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vllm_loader_equals_layout_and_writer(tmp_path, tp):
    import torch.multiprocessing as mp

    config().save_pretrained(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(tp, str(tmp_path), port, failures), nprocs=tp, start_method="spawn")
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert not errors, errors
