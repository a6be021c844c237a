package felix

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	"github.com/coreos/go-iptables/iptables"

	"github.com/margay-dev/margay/felix/calc"
)

// ChainPrefix starts the name of every iptables chain margay owns. Other chains
// are only touched to insert or remove margay's jumps.
const ChainPrefix = "MGY-"

// tables are where margay may have chains, so where stale ones are looked for.
var tables = []string{"filter", "nat"}

// IPTables keeps margay's iptables chains, or ip6tables ones, and the jumps
// into them equal to the desired ones. It reads a table with iptables-save and writes every change to
// it in one iptables-restore --noflush transaction, so no chain is ever seen
// empty or half-written, and a policy change has no window. It runs the
// iptables binaries, which inherit the network namespace of the calling
// thread: call Apply and Cleanup on a thread in the target namespace
// (runtime.LockOSThread). It is not safe for concurrent use.
type IPTables struct {
	log           *slog.Logger
	ipt           *iptables.IPTables
	save, restore string // the binaries of the family
	// OnReset, if set, is told the counts of each rule of a margay chain
	// just before Apply rewrites or removes the chain, which zeroes them.
	OnReset func(RuleCount)
	written map[string][][]string   // table/chain -> the rules Apply last wrote
	applied map[string]appliedTable // what each table held after the last Apply
}

type appliedTable struct {
	chains []calc.Chain
	jumps  []calc.Jump
}

// Resync makes the next Apply read every table rather than trust what the
// last one left, so that it repairs what others changed.
func (t *IPTables) Resync() { clear(t.applied) }

// RuleCount is what a rule of one of margay's chains has matched.
type RuleCount struct {
	Table, Chain   string
	Rule           []string
	Packets, Bytes uint64
}

// NewIPTables finds the iptables binaries and their version, or the
// ip6tables ones for IPv6.
func NewIPTables(log *slog.Logger, v6 bool) (*IPTables, error) {
	cmd, proto := "iptables", iptables.ProtocolIPv4
	if v6 {
		cmd, proto = "ip6tables", iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", cmd, err)
	}
	t := &IPTables{log: log.With("family", cmd), ipt: ipt, written: map[string][][]string{}, applied: map[string]appliedTable{}}
	for _, b := range []struct {
		path *string
		name string
	}{{&t.save, cmd + "-save"}, {&t.restore, cmd + "-restore"}} {
		if *b.path, err = exec.LookPath(b.name); err != nil {
			return nil, fmt.Errorf("%s: %w (install the iptables package)", b.name, err)
		}
	}
	return t, nil
}

// KernelHasIPv6 tells whether the kernel of the calling thread's network
// namespace has IPv6 (not disabled at boot with ipv6.disable=1).
func KernelHasIPv6() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
}

// RandomFully reports whether iptables supports MASQUERADE --random-fully.
func (t *IPTables) RandomFully() bool { return t.ipt.HasRandomFully() }

// table is what iptables-save printed of one table: its chains, each with
// its rules as argument lists after `-A <chain>` and their counters.
type table struct {
	name   string
	chains map[string][][]string
	counts map[string][][2]uint64 // packets and bytes, by rule
	order  []string               // chains in the order listed
}

// reset reports the counters of a chain about to be flushed.
func (t *IPTables) reset(cur table, chain string) {
	if t.OnReset == nil || !strings.HasPrefix(chain, ChainPrefix) {
		return
	}
	for i, r := range cur.chains[chain] {
		c := cur.counts[chain][i]
		if c != [2]uint64{} {
			t.OnReset(RuleCount{Table: cur.name, Chain: chain, Rule: r, Packets: c[0], Bytes: c[1]})
		}
	}
}

// Counts lists the counters of the rules of margay's chains in a table.
func (t *IPTables) Counts(tab string) ([]RuleCount, error) {
	cur, err := t.read(tab)
	if err != nil {
		return nil, err
	}
	var out []RuleCount
	for _, name := range cur.order {
		if !strings.HasPrefix(name, ChainPrefix) {
			continue
		}
		for i, r := range cur.chains[name] {
			c := cur.counts[name][i]
			out = append(out, RuleCount{Table: tab, Chain: name, Rule: r, Packets: c[0], Bytes: c[1]})
		}
	}
	return out, nil
}

// Apply makes margay's chains hold exactly the desired rules, puts each jump
// once at the top of its base chain, and removes margay's chains that are no
// longer desired together with every rule that jumps to them. Only the chains
// whose rules differ are rewritten, each table in one transaction, so a
// second Apply with the same input runs only iptables-save and reports no
// change.
func (t *IPTables) Apply(chains []calc.Chain, jumps []calc.Jump) (changed bool, err error) {
	tabs := slices.Clone(tables)
	for _, c := range chains {
		if !slices.Contains(tabs, c.Table) {
			tabs = append(tabs, c.Table)
		}
	}
	var errs []error
	for _, tab := range tabs {
		var want []calc.Chain
		for _, c := range chains {
			if c.Table != tab {
				continue
			}
			if !strings.HasPrefix(c.Name, ChainPrefix) {
				errs = append(errs, fmt.Errorf("chain %s/%s: margay's chains must start with %s", c.Table, c.Name, ChainPrefix))
				continue
			}
			want = append(want, c)
		}
		var js []calc.Jump
		for _, j := range jumps {
			if j.Table != tab {
				continue
			}
			if !strings.HasPrefix(j.To, ChainPrefix) {
				errs = append(errs, fmt.Errorf("jump %s/%s -> %s: target is not a margay chain", j.Table, j.From, j.To))
				continue
			}
			js = append(js, j)
		}
		// A table Apply left as wanted is not read again (a read costs tens
		// of milliseconds with thousands of rules) until Resync.
		last, ok := t.applied[tab]
		if ok && reflect.DeepEqual(last.chains, want) && reflect.DeepEqual(last.jumps, js) {
			continue
		}
		delete(t.applied, tab)
		c, err := t.applyTable(tab, want, js)
		changed = changed || c
		if err != nil {
			errs = append(errs, err)
			continue
		}
		t.applied[tab] = appliedTable{want, js}
	}
	return changed, errors.Join(errs...)
}

func (t *IPTables) applyTable(tab string, want []calc.Chain, jumps []calc.Jump) (bool, error) {
	cur, err := t.read(tab)
	if err != nil {
		return false, err
	}
	var b restoreBuilder
	desired := map[string]bool{}
	for _, c := range want {
		desired[c.Name] = true
		have, exists := cur.chains[c.Name]
		if exists && slices.EqualFunc(have, c.Rules, slices.Equal) {
			continue
		}
		if exists {
			t.log.Info("iptables chain differs; rewriting", "table", tab, "chain", c.Name, "have", len(have), "want", len(c.Rules))
			t.warnNonCanonical(tab, c, have)
			t.reset(cur, c.Name)
		} else {
			t.log.Info("iptables chain created", "table", tab, "chain", c.Name, "rules", len(c.Rules))
		}
		b.chain(c.Name, c.Rules)
	}
	for _, j := range jumps {
		spec := []string{"-j", j.To}
		rules := cur.chains[j.From]
		n := 0
		for _, r := range rules {
			if slices.Equal(r, spec) {
				n++
			}
		}
		if n == 1 && slices.Equal(rules[0], spec) {
			continue
		}
		// One transaction: the base chain is never without the jump.
		for range n {
			b.line(append([]string{"-D", j.From}, spec...)...)
		}
		b.line("-I", j.From, "1", "-j", j.To)
		t.log.Info("iptables jump placed first", "table", tab, "chain", j.From, "to", j.To, "had", n)
	}
	var stale []string
	for _, name := range cur.order {
		if strings.HasPrefix(name, ChainPrefix) && !desired[name] {
			stale = append(stale, name)
		}
	}
	t.removeChains(&b, cur, stale)
	if b.empty() {
		return false, nil
	}
	if err := t.run(tab, b.String()); err != nil {
		return true, err
	}
	for _, c := range want {
		if b.rewrites(c.Name) {
			t.written[tab+"/"+c.Name] = c.Rules
		}
	}
	return true, nil
}

// warnNonCanonical says which rule of a chain margay wrote as it wants it
// last time lists differently now: a rule iptables prints differently from
// how calc writes it is rewritten on every Apply, so calc's canonical form
// needs fixing (or someone edits the chain).
func (t *IPTables) warnNonCanonical(tab string, c calc.Chain, have [][]string) {
	last, ok := t.written[tab+"/"+c.Name]
	if !ok || !slices.EqualFunc(last, c.Rules, slices.Equal) || len(have) != len(c.Rules) {
		return
	}
	for i := range c.Rules {
		if !slices.Equal(have[i], c.Rules[i]) {
			t.log.Warn("iptables lists a rule differently from how margay wrote it; the chain is rewritten on every Apply",
				"table", tab, "chain", c.Name, "rule", i+1, "written", ruleText(c.Rules, i), "listed", ruleText(have, i))
			return
		}
	}
}

// removeChains adds to b the deletion of the rules in other chains that jump
// to one of chains, then of the chains themselves (flushed first: they may
// jump to each other).
func (t *IPTables) removeChains(b *restoreBuilder, cur table, chains []string) {
	if len(chains) == 0 {
		return
	}
	for _, n := range cur.order {
		if slices.Contains(chains, n) || b.rewrites(n) {
			continue
		}
		for _, r := range cur.chains[n] {
			if slices.Contains(chains, target(r)) {
				b.line(append([]string{"-D", n}, r...)...)
				t.log.Info("iptables jump removed", "chain", n, "to", target(r))
			}
		}
	}
	for _, c := range chains {
		t.reset(cur, c)
		b.chain(c, nil)
	}
	for _, c := range chains {
		b.line("-X", c)
		t.log.Info("iptables chain removed", "chain", c)
	}
}

// Cleanup removes every rule that jumps into a margay chain, then margay's
// chains in the filter and nat tables.
func (t *IPTables) Cleanup() error {
	t.Resync()
	var errs []error
	for _, tab := range tables {
		cur, err := t.read(tab)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		var ours []string
		for _, n := range cur.order {
			if strings.HasPrefix(n, ChainPrefix) {
				ours = append(ours, n)
			}
		}
		var b restoreBuilder
		t.removeChains(&b, cur, ours)
		if !b.empty() {
			errs = append(errs, t.run(tab, b.String()))
		}
	}
	return errors.Join(errs...)
}

func ruleText(rules [][]string, i int) string {
	if i >= len(rules) {
		return ""
	}
	return strings.Join(rules[i], " ")
}

// read lists a table with iptables-save.
func (t *IPTables) read(tab string) (table, error) {
	cmd := exec.Command(t.save, "-c", "-t", tab)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return table{}, fmt.Errorf("%s -t %s: %w: %s", filepath.Base(t.save), tab, err, strings.TrimSpace(stderr.String()))
	}
	tb := parseSave(string(out))
	tb.name = tab
	return tb, nil
}

// parseSave reads one table of iptables-save output, with or without
// counters (-c).
func parseSave(out string) table {
	tb := table{chains: map[string][][]string{}, counts: map[string][][2]uint64{}}
	for _, l := range strings.Split(out, "\n") {
		var count [2]uint64
		if strings.HasPrefix(l, "[") {
			c, rest, ok := strings.Cut(l[1:], "] ")
			if !ok {
				continue
			}
			if _, err := fmt.Sscanf(c, "%d:%d", &count[0], &count[1]); err != nil {
				continue
			}
			l = rest
		}
		switch {
		case strings.HasPrefix(l, ":"):
			name := strings.Fields(l[1:])[0]
			if _, ok := tb.chains[name]; !ok {
				tb.chains[name] = nil
				tb.order = append(tb.order, name)
			}
		case strings.HasPrefix(l, "-A "):
			w := splitRule(l)
			if len(w) < 2 {
				continue
			}
			if _, ok := tb.chains[w[1]]; !ok {
				tb.order = append(tb.order, w[1])
			}
			tb.chains[w[1]] = append(tb.chains[w[1]], protocolNumbers(w[2:]))
			tb.counts[w[1]] = append(tb.counts[w[1]], count)
		}
	}
	return tb
}

// run feeds one table's changes to iptables-restore, which commits them at
// once or not at all.
func (t *IPTables) run(tab, body string) error {
	in := "*" + tab + "\n" + body + "COMMIT\n"
	cmd := exec.Command(t.restore, "--noflush", "--wait")
	cmd.Stdin = strings.NewReader(in)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s of table %s: %w: %s", filepath.Base(t.restore), tab, err, strings.TrimSpace(string(out)))
	}
	return nil
}

// restoreBuilder writes the body of an iptables-restore transaction.
type restoreBuilder struct {
	decl, lines strings.Builder
	rewritten   map[string]bool
}

func (b *restoreBuilder) empty() bool { return b.decl.Len() == 0 && b.lines.Len() == 0 }

func (b *restoreBuilder) rewrites(chain string) bool { return b.rewritten[chain] }

// chain declares a chain, which creates it or flushes it, and appends rules.
func (b *restoreBuilder) chain(name string, rules [][]string) {
	if b.rewritten == nil {
		b.rewritten = map[string]bool{}
	}
	b.rewritten[name] = true
	fmt.Fprintf(&b.decl, ":%s - [0:0]\n", name)
	for _, r := range rules {
		b.line(append([]string{"-A", name}, r...)...)
	}
}

func (b *restoreBuilder) line(words ...string) {
	for i, w := range words {
		if i > 0 {
			b.lines.WriteByte(' ')
		}
		b.lines.WriteString(quoteWord(w))
	}
	b.lines.WriteByte('\n')
}

// String is the transaction: declarations must come before the rules.
func (b *restoreBuilder) String() string { return b.decl.String() + b.lines.String() }

// quoteWord quotes a word for iptables-restore, which splits on blanks and
// understands double quotes with backslash escapes.
func quoteWord(w string) string {
	if w != "" && !strings.ContainsAny(w, " \t\"\\'") {
		return w
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(w) + `"`
}

// protocolNumbers writes "-p <name>" back as the number calc writes:
// iptables prints a protocol by its /etc/protocols name when the file has one
// (4 is "ipencap" on Debian), and by number on hosts without it.
func protocolNumbers(rule []string) []string {
	for i := 0; i+1 < len(rule); i++ {
		if rule[i] == "-p" && rule[i+1] == "ipencap" {
			rule[i+1] = "4"
		}
	}
	return rule
}

// target is where a rule jumps or goes to, "" if nowhere.
func target(rule []string) string {
	for i := 0; i+1 < len(rule); i++ {
		if rule[i] == "-j" || rule[i] == "-g" {
			return rule[i+1]
		}
	}
	return ""
}

// splitRule splits a line of `iptables -S` into its arguments, undoing the
// quoting iptables-save applies to values such as comments ("a b", \" and \\).
func splitRule(line string) []string {
	var (
		words          []string
		w              strings.Builder
		inWord, quoted bool
		escaped        bool
	)
	for _, r := range line {
		switch {
		case escaped:
			w.WriteRune(r)
			escaped = false
		case quoted && r == '\\':
			escaped = true
		case r == '"':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}
