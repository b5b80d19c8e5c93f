;; hello: a command-style workload (WASI `_start`). Writes a line to stdout, publishes one telemetry record on
;; stream "boot", and exits with status 0.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "flotilla" "telemetry" (func $telemetry (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 8) "hello from flotilla\n")
  (data (i32.const 64) "boot")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 8))
    (i32.store (i32.const 4) (i32.const 20))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 32)))
    (drop (call $telemetry (i32.const 64) (i32.const 4) (i32.const 8) (i32.const 19)))))
