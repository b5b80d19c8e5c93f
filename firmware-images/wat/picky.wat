;; picky: a release that fails on chosen devices only. Its initialisation traps when the workload's configuration
;; is not empty, so a per-device config override (`[[workloads.overrides]] match = { device = ".." }`) makes it
;; crash on those devices while it runs everywhere else; used to prove failed-version memory.
(module
  (import "flotilla" "config_len" (func $config_len (result i32)))
  (memory (export "memory") 1)
  (func (export "_initialize")
    (if (i32.gt_s (call $config_len) (i32.const 0))
      (then unreachable)))
  (func (export "tick")))
