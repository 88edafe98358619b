// Command promcheck parses Prometheus text exposition format on stdin with
// Prometheus's own parser (github.com/prometheus/common/expfmt) and prints
// one line per sample: "FAMILY TYPE public_key=KEY VALUE" (public_key empty
// when the sample has none). It exits non-zero when the text does not parse
// or holds no family, so the flannel suite can hold meshvpn's
// --metrics-listen page to the format and compare its numbers with wg show.
package main

import (
	"fmt"
	"os"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

func main() {
	p := expfmt.NewTextParser(model.LegacyValidation)
	families, err := p.TextToMetricFamilies(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "promcheck: not Prometheus text:", err)
		os.Exit(1)
	}
	if len(families) == 0 {
		fmt.Fprintln(os.Stderr, "promcheck: no metric families")
		os.Exit(1)
	}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "public_key" {
					key = l.GetValue()
				}
			}
			var v float64
			switch {
			case m.Counter != nil:
				v = m.GetCounter().GetValue()
			case m.Gauge != nil:
				v = m.GetGauge().GetValue()
			case m.Untyped != nil:
				v = m.GetUntyped().GetValue()
			}
			fmt.Printf("%s %s public_key=%s %.0f\n", name, f.GetType(), key, v)
		}
	}
}
