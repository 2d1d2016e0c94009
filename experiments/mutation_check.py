"""Plant one wiring mistake at a time in a scratch copy of the repository and run the quick test tier on it.

Each mutation below is a single textual change to mokd.py of the kind a refactor could make by accident (a term fed
the other model's teacher, centre, temperature or lambda; the search's pairing; the query's cut; the EMA; the centres'
momentum; the frozen epoch; the clipping; the DINO loss's excluded pairs; ...). For each, the scratch copy's quick
tier (`python -m pytest -q -x -m "not slow" test_mokd.py`) must fail; the table says which test caught it.

    python experiments/mutation_check.py               # every mutation (each stops at its first failing test)
    python experiments/mutation_check.py --only ema_direction search_pairing
    python experiments/mutation_check.py --tier slow -k two_processes   # the two-process mutations
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("mokd.py", "eval_linear.py", "benchmark.py", "test_mokd.py", "pytest.ini", "experiments")

# name: (old text in mokd.py, new text, what it breaks)
MUTATIONS = {
    "L_cm_own_teacher": ('L["L_cm"] = dino_loss(s["m"], t_other["m"]', 'L["L_cm"] = dino_loss(s["m"], t_self["m"]',
                         "L_cm distils from the model's own teacher"),
    "L_cm_self_temperature": ('getattr(centres, f"cm_{x}"), tau_cross)', 'getattr(centres, f"cm_{x}"), tau_self)',
                              "L_cm sharpens with the self temperature"),
    "L_st_mlp_centre": ('dino_loss(s["t"], t_self["t"], getattr(centres, f"st_{x}")',
                        'dino_loss(s["t"], t_self["t"], getattr(centres, f"sm_{x}")', "L_st centred with c_sm"),
    "L_ct_self_temperature": ('cross_entropy(s["t"][n_global_rows:], search_other, tau_cross)',
                              'cross_entropy(s["t"][n_global_rows:], search_other, tau_self)',
                              "L_ct sharpens with the self temperature"),
    "L_ct_global_rows": ('cross_entropy(s["t"][n_global_rows:], search_other',
                         'cross_entropy(s["t"][:len(search_other)], search_other', "L_ct on the global crops' rows"),
    "partner_lambda": ('S["tau_cross"][epoch], cfg[f"lam_{x}"])', 'S["tau_cross"][epoch], cfg[f"lam_{y}"])',
                       "each model weighs its cross terms with the partner's lambda"),
    "partner_self_temperature": ('self.centres, S[x]["tau"][epoch]', 'self.centres, S[y]["tau"][epoch]',
                                 "each model's self terms use the partner's teacher temperature"),
    "search_pairing": ("tiled = g1.repeat(n_local, 1, 1)", "tiled = g1.repeat_interleave(n_local, 0)",
                       "local crop j of image b meets g1 of another image"),
    "search_own_teacher": ('srch = {x: (search(unwrap(self.teachers[y]), t[y]["g1"]',
                           'srch = {x: (search(unwrap(self.teachers[x]), t[x]["g1"]', "the search runs on X's teacher"),
    "query_not_cut": ('out["query"] = self.thead.proj(pooled).detach()', 'out["query"] = self.thead.proj(pooled)',
                      "the query keeps its gradient"),
    "ema_direction": ("torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)",
                      "torch._foreach_lerp_(teacher_params, student_params, m)", "the EMA weight is 1 - m"),
    "centre_momentum": ("CENTER_MOMENTUM = 0.9", "CENTER_MOMENTUM = 0.8", "centres keep 0.8, not 0.9"),
    "centre_from_own_teacher": ('new.update({f"cm_{x}": t[y]["m"]', 'new.update({f"cm_{x}": t[x]["m"]',
                                "c_cm follows the model's own teacher"),
    "frozen_epoch_one_longer": ('if epoch < self.cfg["freeze_last_layer"]:',
                                'if epoch <= self.cfg["freeze_last_layer"]:', "last layers frozen one epoch too long"),
    "clip_of_model_a": ('clip_per_tensor(self.params[m][0], self.cfg[f"clip_grad_{m}"])',
                        'clip_per_tensor(self.params[m][0], self.cfg["clip_grad_a"])',
                        "both models clip with A's clip"),
    "no_clipping": ('clip_per_tensor(self.params[m][0], self.cfg[f"clip_grad_{m}"])', "pass",
                    "gradients are not clipped"),
    "dino_pairs_not_excluded": ("- (p * log_s[:n_global]).sum((0, 2))", "- 0 * (p * log_s[:n_global]).sum((0, 2))",
                                "the DINO loss keeps the pairs v == i"),
    "schedule_by_epoch": ('g["lr"], g["weight_decay"] = float(lr[it])', 'g["lr"], g["weight_decay"] = float(lr[epoch])',
                          "the lr is read at the epoch, not the iteration"),
    "decay_on_exempt_groups": ('float(wd[it]) if g["reg"] else 0.0', 'float(wd[it])',
                               "biases and norms are decayed"),
    "student_temperature": ("STUDENT_TEMP = 0.1", "STUDENT_TEMP = 0.2", "the student temperature is 0.2"),
    "centre_all_reduce": ("            dist.all_reduce(sums)\n", "            pass\n",
                          "the centres are not averaged over processes (slow tier)"),
    "no_ddp": ("        if is_dist():  # under torchrun", "        if False:  # under torchrun",
               "students are not wrapped in DDP: no gradient all-reduce (slow tier)"),
}
TWO_PROCESSES = {"centre_all_reduce", "no_ddp"}  # only a run on two processes can see these: the slow tier


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(MUTATIONS), help="these mutations only")
    p.add_argument("--tier", choices=["quick", "slow"], default="quick", help="which test tier must catch them")
    p.add_argument("-k", dest="tests", help="only the tests of the tier that match this pytest -k expression")
    args = p.parse_args()
    names = args.only or [n for n in MUTATIONS if (n in TWO_PROCESSES) == (args.tier == "slow")]
    marker = "not slow" if args.tier == "quick" else "slow"
    source = open(os.path.join(HERE, "mokd.py")).read()
    rows = []
    for name in names:
        old, new, what = MUTATIONS[name]
        if source.count(old) != 1:
            sys.exit(f"mutation {name}: its text occurs {source.count(old)} times in mokd.py (expected once)")
        with tempfile.TemporaryDirectory() as tmp:
            for f in FILES:
                (shutil.copytree if os.path.isdir(os.path.join(HERE, f)) else shutil.copy)(os.path.join(HERE, f),
                                                                                        os.path.join(tmp, f))
            with open(os.path.join(tmp, "mokd.py"), "w") as f:
                f.write(source.replace(old, new))
            t0 = time.time()
            cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker, "test_mokd.py"]
            cmd += ["-k", args.tests] if args.tests else []
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            failed = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
            caught = r.returncode == 1 and failed
            rows.append((name, what, "caught" if caught else f"MISSED (exit {r.returncode})",
                         failed[0].split("::")[-1] if failed else "-", time.time() - t0))
            print(f"{name:26s} {rows[-1][2]:18s} {rows[-1][3]}  ({rows[-1][4]:.0f} s)", flush=True)
    missed = [r for r in rows if not r[2].startswith("caught")]
    print(f"\n{len(rows) - len(missed)} of {len(rows)} mutations caught by the {args.tier} tier"
          + (f"; missed: {', '.join(r[0] for r in missed)}" if missed else ""))
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
