# shellcheck shell=bash
# Sourced by the benchmark scripts that write benches/RESULTS.md, so each
# regenerates its own part of the file and leaves the others alone.

# results_section FILE NAME: replaces the lines between `<!-- NAME begin -->`
# and `<!-- NAME end -->` in FILE with standard input (markers included),
# or appends them as a new section when FILE has none.
results_section() {
	local file=$1 name=$2 body
	body=$(mktemp) || return 1
	cat >"$body"
	touch "$file"
	awk -v b="<!-- $name begin -->" -v e="<!-- $name end -->" -v bodyf="$body" '
		function emit(l) {
			print b
			while ((getline l < bodyf) > 0) print l
			print e
			done = 1
		}
		$0 == b { skip = 1; emit(); next }
		$0 == e { skip = 0; next }
		!skip { print }
		END { if (!done) { if (NR) print ""; emit() } }
	' "$file" >"$file.tmp" && mv "$file.tmp" "$file"
	local rc=$?
	rm -f "$body"
	return $rc
}
