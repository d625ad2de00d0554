# Sourced by bench/loss_compare.sh and bench/real_grid.sh: run named settings of python -m dpo.train.
#
#   run_settings ARRAY "BASE COMMAND" NAME...
#
# ARRAY names an associative array (setting name -> its flags). Each NAME runs once as
# `BASE COMMAND FLAGS --output-dir $OUT/NAME --overwrite --no-progress`, one after another (on a
# 2-core machine two at once are each more than twice as slow); the command goes to $OUT/NAME.cmd,
# stdout to NAME.out, stderr to NAME.log. A setting whose eval.json exists is not run again, and a
# failed one is reported and does not stop the others.
run_settings() {
    local -n settings=$1
    local base=$2 name flags dir cmd
    shift 2
    for name in "$@"; do
        flags=${settings[$name]:?unknown setting $name (one of: ${!settings[*]})}
        dir=$OUT/$name
        if [ -f "$dir/eval.json" ]; then echo "$name: done already ($dir/eval.json)"; continue; fi
        cmd="$base $flags --output-dir $dir --overwrite --no-progress"
        echo "$name: $cmd"
        echo "$cmd" > "$OUT/$name.cmd"
        $cmd > "$OUT/$name.out" 2> "$OUT/$name.log" || echo "$name: FAILED (see $OUT/$name.log)"
    done
}
