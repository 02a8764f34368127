# Sourced by the launchers (bash): which arguments of `analyze` or `ablate` name directories that every host must
# see. split_analysis_args ARGS... sets RUN_DIRS (the RUN_DIR positionals) and OUT_DIRS (the value of --out).
# An argument counts as a RUN_DIR when it is no option (-...), no key=value override, no value of an option that
# takes one, and no step number after --steps; argparse itself still checks the arguments when the command runs.
split_analysis_args() {
  RUN_DIRS=() OUT_DIRS=()
  local a value_of="" steps=0
  for a in "$@"; do
    if [[ -n "$value_of" ]]; then
      [[ "$value_of" == --out ]] && OUT_DIRS+=("$a")
      value_of=""
      continue
    fi
    if [[ $steps -eq 1 && "$a" =~ ^[0-9]+$ ]]; then continue; fi
    steps=0
    case "$a" in
      --steps) steps=1 ;;
      --out=*) OUT_DIRS+=("${a#--out=}") ;;
      --out|--kind|--path|--heads|--before|--after|--part|--coordinator|--num-processes|--process-id)
        value_of="$a" ;;
      -*|*=*) ;;
      *) RUN_DIRS+=("$a") ;;
    esac
  done
}
