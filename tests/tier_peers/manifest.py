"""What the peers' tier runs, per peer, and what it expects (read by run.py and peers_plugin.py).

paths        the peer's test files run (relative to the fetched folder): every file with a test that
             reaches a replaced function on CPU (found by `run.py --discover`, which runs every CPU
             test file of the fetched sources; what it found is in REACH.md)
discover     the files `--discover` runs
select       a regex on test ids: only these run (None: every test in `paths`)
gpu_only     {regex on test ids: why}: deselected without CUDA, listed as such in the report
xfail        [{match: regex on test ids, dtypes: [...] (the test's dtype parameter, optional), reason,
             strict}]: expected failures under rlhfkern (not in the stock run); with `fp64_check` the
             tier also fails when ours is farther from float64 than the peer's own function
fp64_check   a regex on test ids: each call of a replaced function in these tests is measured
             against float64 (ours and the peer's on the same inputs)
peer_fails   {regex: why}: tests that fail with the peer's own functions too (the fetched tests are
             of another version than the installed peer): reported, not judged
reach        {file: functions}: the drop-ins each file must reach (the tier fails when one of them
             is not called by any test of the file)
invariant    {regex on test ids: why}: peer tests that reach a drop-in but check no value of it (they
             pass with the perturbed stand-in). Any other reaching test that passes under perturbation
             fails the tier, and so does one listed here that fails (the table is stale).
ours         {function: our tests}: where our own suite checks the drop-in's values against the
             installed peer function on the same inputs (issue 12 items 3 and 4); run.py checks the
             tests exist.
unreached    {function: why no CPU peer test reaches it}
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = ROOT / ".peer_tests"

_VERL_ON_CUDA = "tests/test_gpu.py::test_compat_verl_logprobs_entropy_linear_ce_match_verl_on_cuda"
_VERL_MULTI = "tests/test_advantages.py::test_compat_verl_multi_turn_and_trajectories_match_verl"
_VERL_ADV = "tests/test_advantages.py::test_compat_verl_matches_verl"
_ORL_EDGES = "tests/test_ppo_loss.py::test_compat_openrlhf_kl_and_icepop_edge_cases_match_openrlhf"
_PPO = "tests/trainer/ppo/"

_HALF_TRL = ("TRL's test compares with 1e-5 tolerance (torch.equal for selective_log_softmax) against "
             "TRL's own half-precision arithmetic (log_softmax, exp and the sum in float16/bfloat16); the "
             "drop-in computes in float32 and rounds once, so it differs in the last bits and is the closer "
             "to float64 (each case's error against float64, ours and TRL's, in REACH.md; the tier fails if "
             "ours is ever the farther by more than one unit in the last place)")

PEERS = {
    "verl": {
        "paths": [_PPO + "test_core_algos_on_cpu.py", _PPO + "test_dynamic_policy_losses_on_cpu.py",
                  _PPO + "test_loss_aggregation_on_cpu.py", _PPO + "test_reinforce_pp_multiturn_on_cpu.py",
                  _PPO + "test_rollout_corr_integration.py", _PPO + "test_value_loss_normalization_on_cpu.py",
                  "tests/trainer/test_multi_trajectories_advantage_on_cpu.py"],
        # every test file of the sdist that runs on CPU (the others need GPUs, Ray clusters or servers:
        # checkpoint_engine, experimental, single_controller, special_e2e, tools; none of them calls a
        # replaced function)
        "discover": ["tests/trainer", "tests/test_base_config_on_cpu.py", "tests/test_protocol_on_cpu.py",
                     "tests/test_protocol_v2_on_cpu.py"],
        "select": None,
        "gpu_only": {},
        "xfail": [],
        "reach": {
            _PPO + "test_core_algos_on_cpu.py": ["compute_gae_advantage_return", "compute_grpo_outcome_advantage",
                                                 "compute_rloo_outcome_advantage", "kl_penalty"],
            _PPO + "test_dynamic_policy_losses_on_cpu.py": ["agg_loss"],
            _PPO + "test_loss_aggregation_on_cpu.py": ["agg_loss"],
            _PPO + "test_reinforce_pp_multiturn_on_cpu.py": ["compute_reinforce_plus_plus_outcome_advantage"],
            _PPO + "test_rollout_corr_integration.py": ["compute_policy_loss_vanilla"],
            _PPO + "test_value_loss_normalization_on_cpu.py": ["compute_value_loss"],
            "tests/trainer/test_multi_trajectories_advantage_on_cpu.py": ["compute_grpo_outcome_advantage"],
        },
        "invariant": {
            r"test_kl_penalty_straight_through_value_matches_base": "kl_penalty('k3+') == kl_penalty('k3'): "
                                                                    "both perturbed alike",
            r"test_kl_penalty_k3_plus_uses_k2_gradient": "grad of k3+ == grad of k2: both perturbed alike",
            r"test_multi_turn_compute_gae_advantage_return": "two runs differing only at masked positions agree",
            r"test_token_sum_is_microbatch_invariant\[1\]": "one micro-batch: the sum of one call equals that call",
            r"test_token_sum_matches_global_sum_after_fsdp_mean_reduction": "compares sums of calls that a shift "
                                                                             "does not separate (dp_size scaling)",
            r"test_observation_span_does_not_block_returns": "two calls compared at the valid tokens",
            r"TestRolloutISIntegration::(test_metrics_only_mode|test_policy_loss_with_rollout_is)":
                "finite / shape / metric-key checks of compute_policy_loss_vanilla",
            r"test_value_loss_(dp_size_matches_global_mean_after_fsdp_reduce|gradient_invariant_to_microbatch_split"
            r"|without_global_info_is_microbatch_dependent)|test_value_loss_microbatch_invariant_all_modes\[1-"
            r"|test_vf_clipfrac_unaffected_by_normalization": "compares calls of compute_value_loss with one another",
            r"test_compute_advantage_for_(multi|single)_trajector": "compute_advantage against "
                                                                     "compute_advantage_for_multi_trajectories: "
                                                                     "both call it",
        },
        "ours": {
            "masked_whiten": ["tests/test_gae.py::test_compat_verl_masked_whiten_matches_verl"],
            "compute_gae_advantage_return": ["tests/test_gae.py::test_compat_verl_gae_matches_verl",
                                             "tests/test_gae.py::test_compat_verl_gae_multi_turn_matches_verl"],
            "agg_loss": ["tests/test_ppo_loss.py::test_compat_verl_agg_and_value_loss_every_mode_match_verl"],
            "compute_policy_loss": ["tests/test_ppo_loss.py::test_compat_verl_policy_losses_match_verl"],
            "compute_policy_loss_vanilla": ["tests/test_ppo_loss.py::test_compat_verl_policy_losses_match_verl"],
            "compute_value_loss": ["tests/test_ppo_loss.py::test_compat_verl_agg_and_value_loss_every_mode_match_verl"],
            "kl_penalty": ["tests/test_ppo_loss.py::test_compat_verl_kl_penalty_values_and_gradients_match_verl"],
            "compute_grpo_outcome_advantage": [_VERL_ADV, _VERL_MULTI],
            "compute_rloo_outcome_advantage": [_VERL_ADV],
            "compute_reinforce_plus_plus_baseline_outcome_advantage": [_VERL_ADV],
            "compute_reinforce_plus_plus_outcome_advantage": [_VERL_ADV, _VERL_MULTI],
            "logprobs_from_logits": ["tests/test_logprob.py::test_compat_verl_matches_verl", _VERL_ON_CUDA],
            "entropy_from_logits": ["tests/test_logprob.py::test_compat_verl_matches_verl", _VERL_ON_CUDA],
            "linear_cross_entropy": [_VERL_ON_CUDA],
        },
        "unreached": {
            "compute_policy_loss": "deprecated positional form; no test of the sdist calls it",
            "compute_reinforce_plus_plus_baseline_outcome_advantage": "no test of the sdist calls it",
            "masked_whiten": "reached only inside verl's own GAE / REINFORCE++ (replaced as a whole)",
            "logprobs_from_logits": "its tests (tests/utils/ of verl's repository) need CUDA and are not in the sdist",
            "entropy_from_logits": "as logprobs_from_logits",
            "linear_cross_entropy": "verl's implementation is a CUDA Triton kernel (its tests: tests/utils/, "
                                    "CUDA, not in the sdist)",
        },
    },
    "openrlhf": {
        "paths": ["tests/test_actor_entropy_temperature.py", "tests/test_kl_estimator_gradient.py",
                  "tests/test_loss_aggregation.py", "tests/test_reward_shaping.py"],
        "discover": ["tests"],
        "select": None,
        "gpu_only": {},
        "xfail": [],
        "reach": {
            "tests/test_actor_entropy_temperature.py": ["log_probs_from_logits"],
            "tests/test_kl_estimator_gradient.py": ["compute_approx_kl"],
            "tests/test_loss_aggregation.py": ["PolicyLoss"],
            "tests/test_reward_shaping.py": ["PolicyLoss"],
        },
        "invariant": {
            r"test_forward_value_preserved_under_correction": "compute_approx_kl with and without the gradient "
                                                              "correction agree (both perturbed alike)",
            r"test_k3_kl_regularization_does_not_corrupt_optimizer_update": "the sign of an optimizer step",
            r"test_icepop_filters_overflowing_ratio_without_nan": "its loss, -0.5, is the perturbation's fixed point "
                                                                  "(x*1.5+0.25 = x); the rest checks finiteness",
            r"test_policy_loss_token_mean_aggregation_matches_full_batch": "sums of micro-batch calls vs one call",
        },
        "ours": {
            "PolicyLoss": ["tests/test_ppo_loss.py::test_compat_openrlhf_policy_loss_matches_openrlhf", _ORL_EDGES],
            "ValueLoss": ["tests/test_ppo_loss.py::test_compat_openrlhf_value_loss_and_kl_match_openrlhf"],
            "compute_approx_kl": ["tests/test_ppo_loss.py::test_compat_openrlhf_value_loss_and_kl_match_openrlhf",
                                  _ORL_EDGES],
            "log_probs_from_logits": ["tests/test_logprob.py::test_compat_openrlhf_and_trl_match"],
        },
        "unreached": {
            "ValueLoss": "no CPU test of the wheel calls it",
        },
        # the tests load OpenRLHF's files by path from here (tests/../openrlhf)
        "source_dirs": [str(CACHE_DIR / "openrlhf" / "openrlhf")],
        # models/utils.py imports deepspeed at its top (for a function the tests never call); OpenRLHF's
        # own test_actor_entropy_temperature.py stubs it the same way
        "stand_ins": ["deepspeed"],
    },
    "trl": {
        "paths": ["tests/test_utils.py", "tests/test_kernels.py"],
        "discover": ["tests/test_utils.py", "tests/test_kernels.py"],
        # the tests of the replaced functions (the rest of test_utils.py is padding, samplers, model cards,
        # PEFT, hub models); TRL's trainer tests load models from the Hugging Face Hub: not run
        "select": r"test_kernels\.py|SelectiveLogSoftmax|EntropyFromLogits|ChunkedLogProb|ChunkedLMHead|FusedLMHead"
                  r"|fused_lm_head",
        "absent_names": True,
        "fp64_check": r"TestEntropyFromLogits|TestSelectiveLogSoftmax",
        "gpu_only": {},
        "xfail": [
            {"match": r"TestEntropyFromLogits|TestSelectiveLogSoftmax::", "dtypes": ["float16", "bfloat16"],
             "reason": _HALF_TRL, "strict": False},  # some cases agree to the last bit by chance
        ],
        "peer_fails": {
            r"test_utils\.py::TestChunkedLogProbFunction::": "written for TRL <= 1.14's "
            "trl.trainer.utils._ChunkedLogProbFunction.apply(hidden, weight, labels, temperature, chunk_size); "
            "TRL 1.15 moved it to trl.kernels and inserted `bias` (TypeError with TRL's own 1.16 function)",
        },
        "reach": {
            "tests/test_utils.py": ["entropy_from_logits", "selective_log_softmax"],
        },
        "invariant": {},
        "ours": {
            "selective_log_softmax": ["tests/test_logprob.py::test_compat_openrlhf_and_trl_match",
                                      "tests/test_logprob.py::test_compat_trl_dtypes"],
            "entropy_from_logits": ["tests/test_logprob.py::test_compat_openrlhf_and_trl_match",
                                    "tests/test_logprob.py::test_compat_trl_dtypes"],
            "selective_log_softmax_and_entropy": [
                "tests/test_logprob.py::test_compat_openrlhf_and_trl_match",
                "tests/test_logprob.py::test_compat_trl_one_pass_equals_the_two_calls"],
            "ChunkedLogProbFunction": ["tests/test_logprob.py::test_compat_trl_fused_head_equals_trl",
                                       "tests/test_logprob.py::test_compat_trl_fused_head_in_a_model"],
        },
        "unreached": {
            "selective_log_softmax_and_entropy": "new in TRL 1.15: the nearest tests available here predate it",
            "ChunkedLogProbFunction": "TRL's tests of trl.kernels (tests/test_kernels.py, 1.15+: not in the "
                                      "copy used here; the 1.15+ version seen in a code index marks them "
                                      "@require_torch_accelerator); the older test_utils.py ones target the "
                                      "pre-1.15 signature",
        },
    },
}
