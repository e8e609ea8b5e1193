// Every op's schema, in one place (DESIGN.md). Kernels register their implementations
// per dispatch key beside their code: csrc/cpu/<family>.cpp (CPU), csrc/cuda/bindings.cpp (CUDA).
// The extension uses Python's limited API only (this file's module init): one abi3 wheel serves
// Python 3.10+ for a given torch and CUDA. Everything else goes through torch ops.
#include <Python.h>
#include <torch/library.h>

#include <string>

namespace {
#ifndef RLHFKERN_CUDA_ARCHS
#define RLHFKERN_CUDA_ARCHS ""
#endif

// What this extension was built with, one "key=value" a line (rlhfkern._dispatch parses it; the
// arch list itself may hold ';').
std::string build_info() {
  std::string info = "cpu=1";
#ifdef RLHFKERN_WITH_CUDA
  info += "\ncuda=1";
#else
  info += "\ncuda=0";
#endif
  info += "\ncuda_arches=" + std::string(RLHFKERN_CUDA_ARCHS);
#ifdef _OPENMP
  info += "\nopenmp=1";
#else
  info += "\nopenmp=0";
#endif
  return info;
}
}  // namespace

TORCH_LIBRARY(rlhfkern, m) {
  // GAE family (rlhfkern/ops/gae.py has the reference and the contract).
  m.def("gae(Tensor rewards, Tensor values, Tensor mask, float gamma, float lam) -> (Tensor, Tensor)");
  m.def("masked_whiten(Tensor values, Tensor mask, bool shift_mean) -> Tensor");
  // Policy-gradient family (rlhfkern/ops/ppo_loss.py): per-row partial sums [B, 7]; d log_prob and
  // (entropy_grad) d entropy; value loss; KL penalty with its derivative.
  m.def("actor_loss_fwd(Tensor log_prob, Tensor old_log_prob, Tensor advantages, Tensor mask, "
        "Tensor? is_weights, Tensor? entropy, Tensor? ref_log_prob, float clip_low, float clip_high, "
        "float clip_c, int kl_code) -> Tensor");
  m.def("actor_loss_bwd(Tensor coeffs, Tensor w, Tensor log_prob, Tensor old_log_prob, Tensor advantages, "
        "Tensor mask, Tensor? is_weights, Tensor? ref_log_prob, float clip_low, float clip_high, "
        "float clip_c, int kl_code, bool entropy_grad) -> (Tensor, Tensor)");
  m.def("value_loss_fwd(Tensor vpreds, Tensor returns, Tensor old_values, Tensor mask, float clip) -> Tensor");
  m.def("value_loss_bwd(Tensor coeff, Tensor w, Tensor vpreds, Tensor returns, Tensor old_values, Tensor mask, "
        "float clip) -> Tensor");
  // Log-prob family (rlhfkern/ops/logprob.py): per-row log-probs of K labels, entropy, (lse, E_p[z]);
  // d logits into a new buffer or, opted in, into the logits themselves.
  m.def("logprobs_fwd(Tensor logits, Tensor labels, float temperature, bool entropy) -> (Tensor, Tensor, Tensor)");
  // g_sum given: the sum of the label gradients of each row (a vocabulary shard's rows need the
  // whole row's); else computed from the labels that fall in [0, V).
  m.def("logprobs_bwd(Tensor grad_lp, Tensor? grad_ent, Tensor logits, Tensor labels, Tensor stats, "
        "float temperature, Tensor? g_sum) -> Tensor");
  m.def("logprobs_bwd_(Tensor grad_lp, Tensor? grad_ent, Tensor(a!) logits, Tensor labels, Tensor stats, "
        "float temperature, Tensor? g_sum) -> ()");
  // Resharding (rlhfkern/reshard/executor.py): a bucket's segments to and from one flat buffer.
  m.def("pack_segments(Tensor[] segments, Tensor(a!) out) -> ()");
  m.def("unpack_segments(Tensor buffer, Tensor(a!)[] segments) -> ()");
  m.def("kl_penalty_fwd(Tensor log_prob, Tensor ref_log_prob, int kl_code) -> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}

// The module rlhfkern._C itself is empty: importing it loads this library, whose static
// initialisers register the ops above in torch.ops.rlhfkern.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rlhfkern compiled core: ops live in torch.ops.rlhfkern",
                               -1, nullptr};
  return PyModule_Create(&module);
}
