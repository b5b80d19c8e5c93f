;; secret-reader: reads its deployment's secret "token" through the host API when it starts and reports, every
;; tick, the value's length and the sum of its bytes as metrics (never the value itself), so a test can tell that it
;; got exactly the right secret. Without the secret it reports secret_len = -1.
(module
  (import "flotilla" "secret_len" (func $secret_len (param i32 i32) (result i32)))
  (import "flotilla" "secret_read" (func $secret_read (param i32 i32 i32 i32) (result i32)))
  (import "flotilla" "metric" (func $metric (param i32 i32 f64) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "token")
  (data (i32.const 16) "secret_len")
  (data (i32.const 32) "secret_sum")
  (global $len (mut i32) (i32.const -1))
  (global $sum (mut i32) (i32.const 0))
  (func (export "_initialize")
    (local $i i32)
    (global.set $len (call $secret_len (i32.const 0) (i32.const 5)))
    (if (i32.ge_s (global.get $len) (i32.const 0))
      (then
        (drop (call $secret_read (i32.const 0) (i32.const 5) (i32.const 1024) (i32.const 4096)))
        (block $done
          (loop $next
            (br_if $done (i32.ge_s (local.get $i) (global.get $len)))
            (global.set $sum
              (i32.add (global.get $sum) (i32.load8_u (i32.add (i32.const 1024) (local.get $i)))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $next))))))
  (func (export "tick")
    (drop (call $metric (i32.const 16) (i32.const 10) (f64.convert_i32_s (global.get $len))))
    (drop (call $metric (i32.const 32) (i32.const 10) (f64.convert_i32_u (global.get $sum))))))
