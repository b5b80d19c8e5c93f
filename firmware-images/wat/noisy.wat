;; noisy: runs fine (no trap) but reports a bad application metric: every tick it publishes errors = 5 through
;; the host API. A rollout with a telemetry gate on `errors` must stop it.
(module
  (import "flotilla" "metric" (func $metric (param i32 i32 f64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "errors")
  (func (export "tick")
    (drop (call $metric (i32.const 0) (i32.const 6) (f64.const 5)))))
