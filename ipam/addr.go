package ipam

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
)

// Family is an IP version.
type Family int

// The two families. The zero Family means IPv4 where a caller may leave it unset.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// FamilyOf is the family of a.
func FamilyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

func (f Family) String() string {
	if f == IPv6 {
		return "IPv6"
	}
	return "IPv4"
}

// u128 is an address as a number, so that block and ordinal arithmetic is the
// same for both families.
type u128 struct{ hi, lo uint64 }

func toU128(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{lo: uint64(binary.BigEndian.Uint32(b[:]))}
	}
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

func (v u128) addr(f Family) netip.Addr {
	if f == IPv4 {
		var b [4]byte
		binary.BigEndian.PutUint32(b[:], uint32(v.lo))
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	binary.BigEndian.PutUint64(b[:8], v.hi)
	binary.BigEndian.PutUint64(b[8:], v.lo)
	return netip.AddrFrom16(b)
}

func (v u128) add(w u128) u128 {
	lo, carry := bits.Add64(v.lo, w.lo, 0)
	hi, _ := bits.Add64(v.hi, w.hi, carry)
	return u128{hi, lo}
}

func (v u128) sub(w u128) u128 {
	lo, borrow := bits.Sub64(v.lo, w.lo, 0)
	hi, _ := bits.Sub64(v.hi, w.hi, borrow)
	return u128{hi, lo}
}

// shl shifts left by n < 128.
func (v u128) shl(n int) u128 {
	switch {
	case n == 0:
		return v
	case n >= 64:
		return u128{hi: v.lo << (n - 64)}
	}
	return u128{v.hi<<n | v.lo>>(64-n), v.lo << n}
}

// offset is a + n<<shift, in a's family; blocks never run past their family's end.
func offset(a netip.Addr, n uint64, shift int) netip.Addr {
	return toU128(a).add(u128{lo: n}.shl(shift)).addr(FamilyOf(a))
}
