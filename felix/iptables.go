package felix

import (
	"errors"
	"fmt"
	"log/slog"
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

// IPTables keeps margay's iptables chains and the jumps into them equal to the
// desired ones. It runs the iptables binary, which inherits the network
// namespace of the calling thread: call Apply and Cleanup on a thread in the
// target namespace (runtime.LockOSThread). It is not safe for concurrent use.
type IPTables struct {
	log *slog.Logger
	ipt *iptables.IPTables
}

// NewIPTables finds the iptables binary and its version.
func NewIPTables(log *slog.Logger) (*IPTables, error) {
	ipt, err := iptables.New()
	if err != nil {
		return nil, fmt.Errorf("iptables: %w", err)
	}
	return &IPTables{log: log, ipt: ipt}, nil
}

// RandomFully reports whether iptables supports MASQUERADE --random-fully.
func (t *IPTables) RandomFully() bool { return t.ipt.HasRandomFully() }

// Apply makes margay's chains hold exactly the desired rules, puts each jump
// once at the top of its base chain, and removes margay's chains that are no
// longer desired together with every rule that jumps to them. Chains must come
// in dependency order, referenced ones first. A chain is rewritten only when its rules differ, so a
// second Apply with the same input runs only listings and reports no change.
func (t *IPTables) Apply(chains []calc.Chain, jumps []calc.Jump) (changed bool, err error) {
	tabs := slices.Clone(tables)
	for _, c := range chains {
		if !slices.Contains(tabs, c.Table) {
			tabs = append(tabs, c.Table)
		}
	}
	have := map[string]map[string]bool{} // table → margay chains present
	for _, tab := range tabs {
		names, err := t.ipt.ListChains(tab)
		if err != nil {
			return false, fmt.Errorf("list chains of table %s: %w", tab, err)
		}
		have[tab] = map[string]bool{}
		for _, n := range names {
			if strings.HasPrefix(n, ChainPrefix) {
				have[tab][n] = true
			}
		}
	}
	var errs []error
	want := map[string]map[string]bool{}
	for _, c := range chains {
		if !strings.HasPrefix(c.Name, ChainPrefix) {
			errs = append(errs, fmt.Errorf("chain %s/%s: margay's chains must start with %s", c.Table, c.Name, ChainPrefix))
			continue
		}
		if want[c.Table] == nil {
			want[c.Table] = map[string]bool{}
		}
		want[c.Table][c.Name] = true
		c2, err := t.syncChain(c, have[c.Table][c.Name])
		changed = changed || c2
		if err != nil {
			errs = append(errs, fmt.Errorf("chain %s/%s: %w", c.Table, c.Name, err))
		}
	}
	for _, j := range jumps {
		if !strings.HasPrefix(j.To, ChainPrefix) {
			errs = append(errs, fmt.Errorf("jump %s/%s -> %s: target is not a margay chain", j.Table, j.From, j.To))
			continue
		}
		c2, err := t.syncJump(j)
		changed = changed || c2
		if err != nil {
			errs = append(errs, fmt.Errorf("jump %s/%s -> %s: %w", j.Table, j.From, j.To, err))
		}
	}
	for _, tab := range tabs {
		var stale []string
		for n := range have[tab] {
			if !want[tab][n] {
				stale = append(stale, n)
			}
		}
		if len(stale) == 0 {
			continue
		}
		slices.Sort(stale)
		changed = true
		if err := t.removeChains(tab, stale); err != nil {
			errs = append(errs, err)
		}
	}
	return changed, errors.Join(errs...)
}

// Cleanup removes every rule that jumps into a margay chain, then flushes and
// deletes margay's chains in the filter and nat tables.
func (t *IPTables) Cleanup() error {
	var errs []error
	for _, tab := range tables {
		names, err := t.ipt.ListChains(tab)
		if err != nil {
			errs = append(errs, fmt.Errorf("list chains of table %s: %w", tab, err))
			continue
		}
		var ours []string
		for _, n := range names {
			if strings.HasPrefix(n, ChainPrefix) {
				ours = append(ours, n)
			}
		}
		if len(ours) > 0 {
			errs = append(errs, t.removeChains(tab, ours))
		}
	}
	return errors.Join(errs...)
}

// syncChain creates the chain if needed and rewrites it if its rules differ.
func (t *IPTables) syncChain(c calc.Chain, exists bool) (changed bool, err error) {
	if exists {
		cur, err := t.rules(c.Table, c.Name)
		if err != nil {
			return false, err
		}
		if slices.EqualFunc(cur, c.Rules, slices.Equal) {
			return false, nil
		}
		t.log.Info("iptables chain differs; rewriting", "table", c.Table, "chain", c.Name, "have", len(cur), "want", len(c.Rules))
	} else {
		t.log.Info("iptables chain created", "table", c.Table, "chain", c.Name, "rules", len(c.Rules))
	}
	// ClearChain creates a missing chain and flushes an existing one.
	if err := t.ipt.ClearChain(c.Table, c.Name); err != nil {
		return true, err
	}
	for _, r := range c.Rules {
		if err := t.ipt.Append(c.Table, c.Name, r...); err != nil {
			return true, fmt.Errorf("append %q: %w", strings.Join(r, " "), err)
		}
	}
	// A rule iptables prints differently from how calc writes it would be
	// rewritten on every Apply: say which, so calc's canonical form gets fixed.
	cur, err := t.rules(c.Table, c.Name)
	if err != nil {
		return true, err
	}
	for i := range max(len(cur), len(c.Rules)) {
		if i >= len(cur) || i >= len(c.Rules) || !slices.Equal(cur[i], c.Rules[i]) {
			t.log.Warn("iptables lists a rule differently from how it was written; the chain will be rewritten on every Apply",
				"table", c.Table, "chain", c.Name, "rule", i+1, "written", ruleText(c.Rules, i), "listed", ruleText(cur, i))
			break
		}
	}
	return true, nil
}

func ruleText(rules [][]string, i int) string {
	if i >= len(rules) {
		return ""
	}
	return strings.Join(rules[i], " ")
}

// syncJump leaves exactly one `-j To` rule in From, at position 1. A missing
// jump is inserted before the misplaced or duplicated ones are removed, so the
// base chain always passes through margay's chain.
func (t *IPTables) syncJump(j calc.Jump) (changed bool, err error) {
	spec := []string{"-j", j.To}
	cur, err := t.rules(j.Table, j.From)
	if err != nil {
		return false, err
	}
	var at []int // rule numbers, 1-based
	for i, r := range cur {
		if slices.Equal(r, spec) {
			at = append(at, i+1)
		}
	}
	if len(at) == 1 && at[0] == 1 {
		return false, nil
	}
	if len(at) > 0 && at[0] == 1 {
		at = at[1:]
	} else {
		if err := t.ipt.Insert(j.Table, j.From, 1, spec...); err != nil {
			return false, fmt.Errorf("insert: %w", err)
		}
		for i := range at {
			at[i]++
		}
	}
	t.log.Info("iptables jump repaired", "table", j.Table, "chain", j.From, "to", j.To, "removed", len(at))
	// From the bottom up, so the numbers above stay valid; each is checked first,
	// since someone else may have changed the chain since it was listed.
	for _, n := range slices.Backward(at) {
		line, err := t.ipt.ListById(j.Table, j.From, n)
		if err != nil {
			return true, err
		}
		if w := splitRule(line); len(w) < 2 || !slices.Equal(w[2:], spec) {
			return true, fmt.Errorf("rule %d changed under us (now %q); retried on the next Apply", n, line)
		}
		if err := t.ipt.DeleteById(j.Table, j.From, n); err != nil {
			return true, fmt.Errorf("delete duplicate at %d: %w", n, err)
		}
	}
	return true, nil
}

// removeChains deletes every rule in the table's other chains that jumps to one
// of chains, then flushes them all (they may jump to each other) and deletes
// them.
func (t *IPTables) removeChains(table string, chains []string) error {
	names, err := t.ipt.ListChains(table)
	if err != nil {
		return fmt.Errorf("list chains of table %s: %w", table, err)
	}
	var errs []error
	for _, n := range names {
		if slices.Contains(chains, n) {
			continue
		}
		rules, err := t.rules(table, n)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, r := range rules {
			if !slices.Contains(chains, target(r)) {
				continue
			}
			if err := t.ipt.Delete(table, n, r...); err != nil {
				errs = append(errs, fmt.Errorf("delete %s/%s %q: %w", table, n, strings.Join(r, " "), err))
				continue
			}
			t.log.Info("iptables jump removed", "table", table, "chain", n, "to", target(r))
		}
	}
	for _, c := range chains {
		if err := t.ipt.ClearChain(table, c); err != nil {
			errs = append(errs, fmt.Errorf("flush %s/%s: %w", table, c, err))
		}
	}
	for _, c := range chains {
		if err := t.ipt.DeleteChain(table, c); err != nil {
			errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", table, c, err))
			continue
		}
		t.log.Info("iptables chain removed", "table", table, "chain", c)
	}
	return errors.Join(errs...)
}

// rules lists a chain's rules as argument lists, without the leading `-A chain`.
func (t *IPTables) rules(table, chain string) ([][]string, error) {
	lines, err := t.ipt.List(table, chain)
	if err != nil {
		return nil, fmt.Errorf("list %s/%s: %w", table, chain, err)
	}
	var rules [][]string
	for _, l := range lines {
		w := splitRule(l)
		if len(w) >= 2 && w[0] == "-A" && w[1] == chain {
			rules = append(rules, protocolNumbers(w[2:]))
		}
	}
	return rules, nil
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
