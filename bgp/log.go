package bgp

import (
	"context"
	"log/slog"
	"sort"
	"strings"
	"sync/atomic"

	gobgplog "github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/packet/bgp"
)

type goBGPFields = gobgplog.Fields

// goBGPLogger adapts slog to GoBGP's logger. Its Fatal and Panic log at error level
// and return: GoBGP calls Fatal when its gRPC address cannot be bound, and its
// default logger would then exit the whole agent.
type goBGPLogger struct {
	l *slog.Logger
	// level is what GoBGP's SetLogLevel API set; messages less severe are dropped
	// after note has seen them.
	level atomic.Uint32
	// note sees every message, whatever the levels, before it is filtered.
	note func(msg string, f goBGPFields)
}

var _ gobgplog.Logger = (*goBGPLogger)(nil)

func newGoBGPLogger(l *slog.Logger, note func(string, goBGPFields)) *goBGPLogger {
	g := &goBGPLogger{l: l, note: note}
	g.level.Store(uint32(gobgplog.DebugLevel))
	return g
}

func (g *goBGPLogger) Panic(msg string, f gobgplog.Fields) {
	g.log(gobgplog.PanicLevel, slog.LevelError, msg, f)
}

func (g *goBGPLogger) Fatal(msg string, f gobgplog.Fields) {
	g.log(gobgplog.FatalLevel, slog.LevelError, msg, f)
}

func (g *goBGPLogger) Error(msg string, f gobgplog.Fields) {
	g.log(gobgplog.ErrorLevel, slog.LevelError, msg, f)
}

func (g *goBGPLogger) Warn(msg string, f gobgplog.Fields) {
	g.log(gobgplog.WarnLevel, slog.LevelWarn, msg, f)
}

func (g *goBGPLogger) Info(msg string, f gobgplog.Fields) {
	g.log(gobgplog.InfoLevel, slog.LevelInfo, msg, f)
}

func (g *goBGPLogger) Debug(msg string, f gobgplog.Fields) {
	g.log(gobgplog.DebugLevel, slog.LevelDebug, msg, f)
}

func (g *goBGPLogger) SetLevel(level gobgplog.LogLevel) { g.level.Store(uint32(level)) }

// GetLevel always claims debug: GoBGP produces some messages, such as why a
// connection attempt failed, only at debug level, and note needs them. The slog
// handler still decides what is written.
func (g *goBGPLogger) GetLevel() gobgplog.LogLevel { return gobgplog.DebugLevel }

func (g *goBGPLogger) log(level gobgplog.LogLevel, sl slog.Level, msg string, f gobgplog.Fields) {
	if g.note != nil {
		g.note(msg, f)
	}
	if level > gobgplog.LogLevel(g.level.Load()) {
		return
	}
	ctx := context.Background()
	if !g.l.Enabled(ctx, sl) {
		return
	}
	keys := make([]string, 0, len(f))
	for k := range f {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		attrs = append(attrs, slog.Any(strings.ToLower(k), f[k]))
	}
	g.l.LogAttrs(ctx, sl, msg, attrs...)
}

// notificationText describes the BGP NOTIFICATION in a GoBGP "sent notification"
// or "received notification" message.
func notificationText(f goBGPFields) string {
	if e, ok := f["Data"].(*bgp.MessageError); ok {
		return bgp.NewNotificationErrorCode(e.TypeCode, e.SubTypeCode).String() + ": " + e.Message
	}
	code, _ := f["Code"].(uint8)
	sub, _ := f["Subcode"].(uint8)
	text := bgp.NewNotificationErrorCode(code, sub).String()
	if r, _ := f["Communicated-Reason"].(string); r != "" {
		text += " (" + r + ")"
	}
	return text
}
