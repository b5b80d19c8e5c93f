;; sensor: a long-running ticked workload. Every tick it increments a counter and publishes it on the telemetry
;; stream "count" as 8 little-endian bytes through the Flotilla host API. It logs its configuration once.
(module
  (import "flotilla" "telemetry" (func $telemetry (param i32 i32 i32 i32) (result i32)))
  (import "flotilla" "config_len" (func $config_len (result i32)))
  (import "flotilla" "config_read" (func $config_read (param i32 i32) (result i32)))
  (import "flotilla" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "count")
  (global $n (mut i64) (i64.const 0))
  (func (export "_initialize")
    ;; Copy the config to offset 1024 and log it.
    (drop (call $config_read (i32.const 1024) (i32.const 1024)))
    (call $log (i32.const 1024) (call $config_len)))
  (func (export "tick")
    (global.set $n (i64.add (global.get $n) (i64.const 1)))
    (i64.store (i32.const 16) (global.get $n))
    (drop (call $telemetry (i32.const 0) (i32.const 5) (i32.const 16) (i32.const 8)))))
