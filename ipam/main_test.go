package ipam

import (
	"log/slog"
	"os"
	"testing"
)

func TestMain(m *testing.M) {
	// Block claims and releases log at info; thousands of them drown test output.
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	os.Exit(m.Run())
}
