#!/usr/bin/env bash
# Lists words about how the project was built rather than what it does: rounds of work, tracker
# numbers, a design file outside the repository. Prints each hit as FILE:LINE:TEXT and exits 1;
# exits 0 when there is none.
#
#   bash tools/check_process_words.sh                    # every file git tracks
#   bash tools/check_process_words.sh docs README.md     # some paths only
#
# Not hits: pytest fixture scopes (scope="session") and library names (InferenceSession,
# ClientSession, requests.Session, SessionOptions). A line that holds one of those is still
# checked for the other words.
set -uo pipefail
cd "$(dirname "$0")/.."

# spelled in pieces, so this file does not match itself
pattern='\b(sess''ion|sess''ions)\b|this st''op|\biss''ue [0-9]+\b|DES''IGN\.md'
allowed='scope *= *["'"'"']session["'"'"']|InferenceSession|ClientSession|requests\.Session|SessionOptions'

hits=$(git ls-files -z -- "$@" \
    | grep -z -v -E '^tools/check_process_words\.sh$|\.(png|jpe?g|gif|safetensors|bin|onnx|pth?)$' \
    | xargs -0 -r grep -n -I -i -E "$pattern" -- 2>/dev/null)

found=0
while IFS= read -r hit; do
    [ -n "$hit" ] || continue
    text=${hit#*:}      # drop FILE:
    text=${text#*:}     # drop LINE:
    if printf '%s\n' "$text" | sed -E "s/$allowed//g" | grep -q -i -E "$pattern"; then
        printf '%s\n' "$hit"
        found=$((found + 1))
    fi
done <<< "$hits"

if [ "$found" -gt 0 ]; then
    echo "check_process_words: $found line(s) name how the work was done rather than the product" >&2
    exit 1
fi
exit 0
