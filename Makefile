# caddy-duplex — build, demo and test targets. See README.md.
GO      ?= go
NODE    ?= node
BIN     := bin
DEMO_UI := http://localhost:8080

FUZZ_TARGETS := FuzzDecodeClientFrame FuzzReadLine FuzzDecodePublish FuzzDecodePublishFast FuzzMessageTarget FuzzPostFrames FuzzScopeMethods
FUZZTIME     ?= 60s

.PHONY: build demo demo-cluster test fuzz bench clean

## build: Caddy with the duplex plugin (bin/caddy) and the demo app (bin/demo-app)
build:
	$(GO) build -o $(BIN)/caddy ./cmd/caddy
	$(GO) build -o $(BIN)/demo-app ./testdata/demo/app

## demo: build, then run the demo app and Caddy in front of it (Ctrl-C stops both)
demo: build
	@echo ">> demo: open $(DEMO_UI) in two browser windows; Ctrl-C stops it"
	@$(BIN)/demo-app & app=$$!; \
	trap 'kill $$app 2>/dev/null; wait $$app 2>/dev/null' EXIT INT TERM; \
	$(BIN)/caddy run --config testdata/demo/Caddyfile

## demo-cluster: the demo on two Caddy nodes sharing sessions through Redis
## (needs redis-server): http://localhost:8080 and http://localhost:8081
demo-cluster: build
	@echo ">> demo-cluster: open http://localhost:8080 and http://localhost:8081; Ctrl-C stops it"
	@redis-server --port 6390 --save '' --appendonly no --maxmemory-policy noeviction >/dev/null & redis=$$!; \
	$(BIN)/demo-app & app=$$!; \
	PORT=8081 ADMIN=2020 $(BIN)/caddy run --config testdata/demo/Caddyfile.cluster --adapter caddyfile & node2=$$!; \
	trap 'kill $$node2 $$app $$redis 2>/dev/null; wait 2>/dev/null' EXIT INT TERM; \
	PORT=8080 ADMIN=2019 $(BIN)/caddy run --config testdata/demo/Caddyfile.cluster --adapter caddyfile

## test: vet, the JS client's unit tests (Node), every Go test with the race
## detector (builds a -race Caddy once; the browser tests need Chromium),
## then each fuzz target on 3000 inputs (a count, not a duration: the fuzzer's
## own deadline can fail a short timed run on a loaded machine)
test:
	$(GO) vet ./... ./testdata/demo/app
	$(NODE) --test jsclient/
	$(GO) test -race -count=1 -timeout 30m ./...
	@$(MAKE) --no-print-directory fuzz FUZZTIME=3000x

## fuzz: each fuzz target for FUZZTIME (default 60s)
fuzz:
	@for f in $(FUZZ_TARGETS); do \
		echo ">> $$f ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) . || exit 1; \
	done

## bench: Go micro-benchmarks (frame encoding, hub fan-out), then the
## benchmark harness: Caddy + plugin against the reference server over
## loopback, one table, then the cluster rows beside Centrifugo (see
## BENCHMARKS.md; about 12 minutes on 2 cores)
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...
	$(GO) run ./bench

## bench-quick: the harness only, with small sizes and 3 s phases (~3 minutes)
.PHONY: bench-quick
bench-quick:
	$(GO) run ./bench -quick

clean:
	rm -rf $(BIN)
