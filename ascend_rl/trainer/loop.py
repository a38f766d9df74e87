"""The RL step loop (verl's single-controller order), one method per stage.

prompts → generate (n per prompt; ReMax: and a greedy one) → rewards → old log-probs → ref log-probs → values
→ advantages → critic update → actor update
→ checkpoint → weight sync → validation → metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ascend_rl.algorithms import apply_kl_in_reward, bypass_mode, compute_advantages
from ascend_rl.algorithms.registry import ADV_ESTIMATORS
from ascend_rl.algorithms.rollout_correction import diagnostics, is_weights, rejection_mask
from ascend_rl.data.collate import collate
from ascend_rl.distributed.worker_group import WorkerDied
from ascend_rl.errors import UserError
from ascend_rl.reward import log_failures
from ascend_rl.rollout.protocol import SamplingParams
from ascend_rl.trainer import checkpoint
from ascend_rl.trainer.batch import RolloutBatch
from ascend_rl.trainer.components import Components
from ascend_rl.trainer.metrics import data_metrics, throughput_metrics, timed
from ascend_rl.workers.model_io import logprob_metrics


@dataclass
class FitResult:
    steps: int
    val_before: dict[str, float]
    val_after: dict[str, float]
    out_dir: Path
    resumed_step: int = 0


def sample_seed(seed: int, step: int, index: int) -> int:
    """A distinct, reproducible seed per (run seed, step, sample)."""
    return ((seed * 1_000_003 + step) * 100_003 + index) % (2**62)


def old_log_probs_needed(cfg) -> bool:
    """A separate old-log-prob pass is needed unless the update is one optimizer step on the whole batch (one
    mini-batch, one epoch): then the old log-probs equal the update's own forward, which supplies them (and
    the entropy and engine-vs-trainer metrics), and a forward over the batch is saved. KL in the reward
    and estimators that read them need them before the update. In bypass mode the engine's stand in for them."""
    if bypass_mode(cfg.algorithm):
        return False
    actor = cfg.actor_rollout_ref.actor
    on_policy = actor.ppo_epochs == 1 and actor.ppo_mini_batch_size >= cfg.data.train_batch_size
    needed_by_estimator = "old_log_probs" in ADV_ESTIMATORS.needs(cfg.algorithm.adv_estimator)
    return not on_policy or cfg.algorithm.use_kl_in_reward or needed_by_estimator or bool(rollout_correction(cfg))


def rollout_correction(cfg) -> dict | None:
    """verl's decoupled rollout correction (`algorithm.rollout_correction` with bypass_mode off), against the old
    log-probs: importance-sampling weights (`rollout_is`, truncated at `rollout_is_threshold`) for the policy
    loss, and rejection filters (`rollout_rs`) on the response mask; None when neither is set (or in bypass
    mode, where the bypass_mode loss applies them per micro-batch)."""
    rc = cfg.algorithm.get("rollout_correction")
    if rc is None or bypass_mode(cfg.algorithm) or (rc.get("rollout_is") is None and rc.get("rollout_rs") is None):
        return None
    return {key: rc.get(key) for key in ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize",
                                         "rollout_rs", "rollout_rs_threshold")}


class RLTrainer:
    # What the estimators may ask for beyond rewards, mask and groups (config/lint.py's TRAINER_INPUTS).
    ESTIMATOR_INPUTS = ("old_log_probs", "reward_baselines", "values")

    def __init__(self, components: Components):
        self.c = components
        self.cfg = components.cfg
        self.global_step = 0
        self.needs_old_log_probs = old_log_probs_needed(self.cfg)
        self.bypass_mode = bypass_mode(self.cfg.algorithm)
        self.correction = rollout_correction(self.cfg)
        self.estimator_needs = ADV_ESTIMATORS.needs(self.cfg.algorithm.adv_estimator)

    # --- the loop ---------------------------------------------------------------------------------

    def fit(self) -> FitResult:
        c, trainer_cfg = self.c, self.cfg.trainer
        try:
            resumed_step = self.global_step = self.resume()
            if resumed_step >= c.total_steps:
                return FitResult(resumed_step, {}, {}, c.out_dir, resumed_step)
            c.report.open(self.global_step)
            c.report.explain_scores()
            self.sync_weights()
            val_before = {}
            if trainer_cfg.val_before_train and c.validator:
                val_before = self.validate()
                c.report.log(val_before, self.global_step)
            val_metrics = val_before
            bar = c.report.progress(self.global_step)
            while self.global_step < c.total_steps:
                self.global_step += 1
                with c.profiler.step(self.global_step):
                    metrics = self.train_step(self.global_step)
                if self._due(trainer_cfg.test_freq) and c.validator:
                    val_metrics = self.validate()
                    metrics.update(val_metrics)
                c.report.log(metrics, self.global_step)
                bar.update(1)
                bar.set_postfix(c.report.postfix(metrics, val_metrics))
            bar.close()
            wants_final = trainer_cfg.test_freq > 0 or trainer_cfg.val_before_train
            if c.validator and wants_final and not self._due(trainer_cfg.test_freq):
                val_metrics = self.validate()
                c.report.log(val_metrics, self.global_step)
        except WorkerDied as err:
            latest = checkpoint.latest_checkpoint(c.out_dir)
            raise WorkerDied(f"{err} at step {self.global_step}; " + (
                f"resume from {latest} (trainer.resume_mode=auto does)" if latest else "no checkpoint to resume from "
                "yet (trainer.save_freq)")) from None
        finally:
            c.close()  # scorer processes, worker processes and metric files, also when a step fails
        c.report.plot()
        return FitResult(self.global_step, val_before, val_metrics, c.out_dir, resumed_step)

    def train_step(self, step: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {}
        with timed(timings, "step"):
            prompts = self.c.next_prompts()
            with timed(timings, "gen"):
                batch = self.generate(prompts, step)
            if "reward_baselines" in self.estimator_needs:
                with timed(timings, "gen_max"):
                    batch.baseline_outputs = self.generate_greedy(prompts)
            self.sleep_engine()
            with timed(timings, "reward"):
                metrics.update(self.compute_rewards(batch))
            if self.bypass_mode:  # verl's bypass mode: the engine's log-probs are the old policy's
                batch["old_log_probs"] = batch["rollout_log_probs"]
            elif self.needs_old_log_probs:
                with timed(timings, "old_log_prob"):
                    metrics.update(self.compute_old_log_probs(batch))
            if self.c.ref is not None:
                with timed(timings, "ref"):
                    self.compute_ref_log_probs(batch)
            if self.c.critic is not None:
                with timed(timings, "values"):
                    batch["values"] = self.c.critic.values(batch.tensors)
            with timed(timings, "adv"):
                metrics.update(self.compute_advantages(batch))
            if self.needs_old_log_probs:  # verl's decoupled mode
                metrics.update(self.correct_rollout(batch))
            if self.c.critic is not None:
                with timed(timings, "update_critic"):
                    metrics.update(self.c.critic.update(batch.tensors))
            if self.c.critic is None or step >= self.cfg.trainer.critic_warmup:  # verl: warm the critic up first
                with timed(timings, "update_actor"):
                    metrics.update(self.c.actor.update(batch.tensors))
            last_step = step == self.c.total_steps
            if self._due(self.cfg.trainer.save_freq) or (last_step and self.cfg.trainer.save_freq > 0):
                with timed(timings, "save_checkpoint"):
                    self.save_checkpoint()
            with timed(timings, "update_weights"):
                metrics.update(self.sync_weights(timings))
        metrics.update(data_metrics(batch, self.cfg.data.max_response_length))
        metrics.update(timings)
        metrics.update(throughput_metrics(batch, timings["timing_s/step"], self.c.n_devices))
        metrics.update({"training/global_step": step, "training/epoch": self.c.sampler.epoch})
        return metrics

    # --- stages -------------------------------------------------------------------------------------

    def generate(self, prompts, step: int) -> RolloutBatch:
        """n samples per prompt (interleaved), each with its own seed."""
        ro, n = self.cfg.actor_rollout_ref.rollout, self.cfg.actor_rollout_ref.rollout.n
        # the config read once: six OmegaConf lookups per sample cost 20 ms a step for 512 samples
        shared = dict(max_new_tokens=self.cfg.data.max_response_length, temperature=ro.temperature, top_p=ro.top_p,
                      top_k=ro.top_k, ignore_eos=ro.ignore_eos)
        params = [SamplingParams(**shared, sampling_seed=sample_seed(self.c.seed, step, i))
                  for i in range(len(prompts) * n)]
        inputs = [p.input_ids for p in prompts for _ in range(n)]
        outputs = self.c.engine.generate(inputs, params, return_logprob=True)
        tensors = collate(inputs, [o.output_ids for o in outputs], self.c.vocab.pad_token_id)
        rollout_lp = torch.zeros_like(tensors["response_mask"])
        for row, out in enumerate(outputs):
            rollout_lp[row, :len(out.output_logprobs)] = torch.tensor(out.output_logprobs, dtype=rollout_lp.dtype)
        tensors["rollout_log_probs"] = rollout_lp
        records = [p for p in prompts for _ in range(n)]
        return RolloutBatch(
            tensors=tensors,
            uid=[f"{step}-{i // n}" for i in range(len(records))],
            data_source=[r.data_source for r in records],
            ground_truth=[r.ground_truth for r in records],
            extra_info=[r.extra_info for r in records],
            response_text=self.c.vocab.decode([o.output_ids for o in outputs]),
        )

    def generate_greedy(self, prompts) -> list:
        """ReMax's baseline: one greedy response per prompt."""
        params = SamplingParams(max_new_tokens=self.cfg.data.max_response_length, temperature=0.0)
        return self.c.engine.generate([p.input_ids for p in prompts], params)

    def compute_rewards(self, batch: RolloutBatch) -> dict[str, float]:
        """Rule/custom scores, shaped by the reward manager, placed on each response's last token (and ReMax's
        greedy baselines scored the same way); why any failed is logged once a step."""
        scored = self.c.rewards.score(batch.data_source, batch.response_text, batch.ground_truth, batch.extra_info)
        mask = batch["response_mask"]
        lengths = mask.sum(-1)
        shaped = self.c.reward_manager(torch.tensor([s.score for s in scored], dtype=mask.dtype), lengths)
        scores = torch.zeros_like(mask)
        scores[torch.arange(len(batch)), (lengths.long() - 1).clamp(min=0)] = shaped.rewards
        batch["token_level_scores"] = scores * mask
        failures = log_failures(scored)
        if batch.baseline_outputs is not None:
            batch["reward_baselines"], baseline_failures = self._score_baselines(batch)
            failures += baseline_failures
        return {"reward/failures": float(failures), **shaped.metrics}

    def _score_baselines(self, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
        n = self.cfg.actor_rollout_ref.rollout.n
        first = slice(0, len(batch), n)  # samples are interleaved: prompt i's are rows i·n … i·n + n − 1
        outputs = batch.baseline_outputs
        scored = self.c.rewards.score(batch.data_source[first], self.c.vocab.decode([o.output_ids for o in outputs]),
                                      batch.ground_truth[first], batch.extra_info[first])
        lengths = torch.tensor([len(o.output_ids) for o in outputs])
        shaped = self.c.reward_manager(torch.tensor([s.score for s in scored]), lengths)
        return shaped.rewards.to(batch["response_mask"].dtype).repeat_interleave(n), log_failures(scored)

    def compute_old_log_probs(self, batch: RolloutBatch) -> dict[str, float]:
        old, entropy = self.c.actor.log_probs(batch.tensors)
        batch["old_log_probs"] = old
        return logprob_metrics(old, entropy, batch["rollout_log_probs"], batch["response_mask"])

    def correct_rollout(self, batch: RolloutBatch) -> dict[str, float]:
        """verl's rollout_corr/* metrics of the engine against the old policy; with `rollout_rs` the response
        mask (and the advantages) without the tokens or sequences its filters reject, with `rollout_is` the
        weights the policy loss multiplies by. After the advantages, as verl's outcome estimators score a
        sequence by all its rewards, rejected tokens included; GAE's recursion, which verl runs over the reduced
        mask, sees the whole response here."""
        mask, c = batch["response_mask"], self.correction or {}
        log_ratio = batch["old_log_probs"] - batch["rollout_log_probs"]
        kept = mask if c.get("rollout_rs") is None else rejection_mask(log_ratio, mask, c["rollout_rs"],
                                                                      c["rollout_rs_threshold"])
        weights = None
        if c.get("rollout_is") is not None and c.get("rollout_is_threshold") is not None:
            weights = is_weights(log_ratio, kept, c["rollout_is"], c["rollout_is_threshold"],
                                 bool(c.get("rollout_is_batch_normalize")))
            batch["rollout_is_weights"] = weights
        metrics = {name: value.item() for name, value in diagnostics(log_ratio, mask, kept, weights).items()}
        if kept is not mask:
            batch["response_mask"] = kept
            batch["advantages"] = batch["advantages"] * kept
        return metrics

    def compute_ref_log_probs(self, batch: RolloutBatch) -> None:
        batch["ref_log_prob"] = self.c.ref.log_probs(batch.tensors)

    def compute_advantages(self, batch: RolloutBatch) -> dict[str, float]:
        alg, metrics = self.cfg.algorithm, {}
        if alg.use_kl_in_reward:
            batch["token_level_rewards"], metrics = apply_kl_in_reward(
                batch["token_level_scores"], batch["old_log_probs"], batch["ref_log_prob"], batch["response_mask"],
                self.c.kl_controller, alg.kl_penalty)
        else:
            batch["token_level_rewards"] = batch["token_level_scores"]
        inputs = {name: batch[name] for name in self.estimator_needs}  # start-up checks guarantee they exist
        batch["advantages"], batch["returns"] = compute_advantages(
            alg.adv_estimator, token_level_rewards=batch["token_level_rewards"], response_mask=batch["response_mask"],
            index=batch.uid, gamma=alg.gamma, lam=alg.lam, norm_adv_by_std_in_grpo=alg.norm_adv_by_std_in_grpo,
            **inputs)
        return metrics

    def sleep_engine(self) -> None:
        """Free the engine's KV cache and weights for the training stages (verl's free_cache_engine)."""
        if self.cfg.actor_rollout_ref.rollout.free_cache_engine:
            self.c.engine.release_memory_occupation(["kv_cache", "weights"])

    def sync_weights(self, timings: dict[str, float] | None = None) -> dict[str, float]:
        """Wake the engine's weights, push the actor's in buckets, then wake its KV cache (verl's hybrid order)."""
        timings = {} if timings is None else timings
        engine = self.c.engine
        with timed(timings, "wake_weights"):
            engine.resume_memory_occupation(["weights"])
        with timed(timings, "push_weights"):
            stats = self.c.rollout.sync_from(self.c.actor)
        with timed(timings, "wake_kv_cache"):
            engine.resume_memory_occupation(["kv_cache"])
            engine.flush_cache()
        return stats.metrics()

    def validate(self) -> dict[str, float]:
        return self.c.validator.run(self.c.engine)

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        c = self.c
        state = {"actor": c.actor.state_dict(), "sampler": c.sampler.state_dict(), "rng": checkpoint.rng_state(),
                 "kl_coef": c.kl_controller.value if c.kl_controller else None,
                 **({"critic": c.critic.state_dict()} if c.critic else {})}
        checkpoint.save_checkpoint(c.out_dir, self.global_step, c.save_models, state,
                                   self.cfg.trainer.max_actor_ckpt_to_keep)

    def resume(self) -> int:
        c = self.c
        path = checkpoint.checkpoint_to_resume(self.cfg.trainer.resume_mode, c.out_dir,
                                               self.cfg.trainer.resume_from_path)
        if path is None:
            return 0
        state = checkpoint.load_state(path, ("actor", "critic") if c.critic else ("actor",))
        try:
            c.sampler.load_state_dict(state["sampler"])
        except ValueError as err:  # another dataset or data.seed than the checkpoint's run
            raise UserError(f"cannot resume from {path}: {err}") from None
        try:
            c.actor.load_state(path / "actor", state["actor"])
            if c.critic:
                c.critic.load_state(path / "critic", state["critic"])
        except (RuntimeError, ValueError, KeyError, CheckpointException) as err:  # shards of another model
            raise UserError(f"cannot resume from {path}: its model or optimizer state does not fit this run's "
                            f"model ({_last_line(err)})") from None
        checkpoint.restore_rng_state(state["rng"])
        if c.kl_controller is not None and state.get("kl_coef") is not None:
            c.kl_controller.value = state["kl_coef"]
        c.report.write(f"resumed from {path} (step {state['step']})")
        return state["step"]

    def _due(self, freq: int) -> bool:
        return freq is not None and freq > 0 and self.global_step % freq == 0


def _last_line(err: BaseException) -> str:
    """A worker's error arrives with its traceback; the last line says what went wrong."""
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__
