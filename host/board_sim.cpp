// The Verilator twin of a board: the board top (rtl/board_top.py, Verilog module `board_top`)
// with its UART lines bridged to a pseudo-terminal, so the host opens the simulated board with
// the same pyserial code as a real one (docs/link.md, "The Verilator twin").
//
// Usage: Vboard_top
//
// Opens a pseudo-terminal (raw, no echo) and prints `pty <slave path>` on standard output.
// Bytes the host writes to the slave are sent on `rx` as 8N1 at DIVISOR clock cycles a bit
// (a compile-time define, the divisor the top was built with); `tx` is sampled every cycle and
// each 8N1 byte on it is written to the host. The clock does not run until the host's first
// byte; from then on it runs at full speed while the line or the layer is busy, and at most
// IDLE_CYCLES cycles a millisecond while both are idle (so an idle twin costs little CPU and
// the device's ACK timeout, counted in cycles, still runs out).
//
// Ends with status 0 when the host has closed the port (after its first byte) or on SIGTERM or
// SIGINT, printing `cycles <n> rx_bytes <n> tx_bytes <n> tx_framing_errors <n>` on standard
// error; on any failure it prints `error: ...` on standard error and exits with status 1. It
// also ends when its parent process dies.

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <termios.h>
#include <unistd.h>

#include "Vboard_top.h"
#include "verilated.h"

#ifndef DIVISOR
#error "DIVISOR (clock cycles per UART bit) must be defined"
#endif

namespace {

// While idle, at most this many cycles per millisecond of waiting for the host.
constexpr uint64_t IDLE_CYCLES = 512;
// The line and the layer count as idle after this many cycles without activity.
constexpr uint64_t IDLE_AFTER = 40 * DIVISOR + 4096;
// Bytes read from the host but not yet sent on rx: beyond this, the pty holds them back.
constexpr std::size_t RX_QUEUE = 4096;

volatile std::sig_atomic_t stop_requested = 0;

void on_signal(int) { stop_requested = 1; }

[[noreturn]] void fail(const std::string& message) {
    std::fprintf(stderr, "error: %s\n", message.c_str());
    std::exit(1);
}

// The master side of a pseudo-terminal in raw mode; `hold` keeps the slave open until the
// host has connected, so that a slave nobody has opened yet does not read as hung up.
struct Pty {
    int master = -1;
    int hold = -1;
    std::string path;

    Pty() {
        master = posix_openpt(O_RDWR | O_NOCTTY);
        if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0)
            fail(std::string("cannot open a pseudo-terminal: ") + std::strerror(errno));
        const char* name = ptsname(master);
        if (name == nullptr) fail("ptsname failed");
        path = name;
        hold = open(name, O_RDWR | O_NOCTTY);
        if (hold < 0) fail("cannot open " + path + ": " + std::strerror(errno));
        termios mode{};
        if (tcgetattr(hold, &mode) != 0) fail("tcgetattr failed");
        cfmakeraw(&mode);
        if (tcsetattr(hold, TCSANOW, &mode) != 0) fail("tcsetattr failed");
        if (fcntl(master, F_SETFL, O_NONBLOCK) != 0) fail("cannot make the pty non-blocking");
    }

    void release_hold() {
        if (hold >= 0) close(hold);
        hold = -1;
    }
};

// 8N1 serializer onto `rx`: start bit, 8 data bits LSB first, stop bit, DIVISOR cycles each.
class Serializer {
  public:
    // The level of `rx` for this cycle; takes the next byte from `queue` when idle.
    uint8_t level(std::deque<uint8_t>& queue) {
        if (bit_ == 10 && !queue.empty()) {
            frame_ = (1u << 9) | (static_cast<unsigned>(queue.front()) << 1);   // stop, data, start
            queue.pop_front();
            bit_ = 0;
            count_ = 0;
        }
        if (bit_ == 10) return 1;
        uint8_t out = (frame_ >> bit_) & 1;
        if (++count_ == DIVISOR) {
            count_ = 0;
            ++bit_;
        }
        return out;
    }

    bool busy() const { return bit_ != 10; }

  private:
    unsigned frame_ = 0, bit_ = 10, count_ = 0;
};

// 8N1 deserializer of `tx`: a falling edge starts a byte; each bit is sampled at its middle.
class Deserializer {
  public:
    // Feeds one cycle's `tx`; returns true with `byte` set when a byte with a good stop bit
    // ends; a low stop bit counts as a framing error and drops the byte.
    bool sample(uint8_t tx, uint8_t& byte) {
        bool done = false;
        if (!active_) {
            if (previous_ && !tx) {
                active_ = true;
                count_ = 0;
                bit_ = 0;
                value_ = 0;
            }
        } else if (++count_ == DIVISOR / 2 + bit_ * DIVISOR) {
            if (bit_ == 0 && tx) active_ = false;                // a glitch, not a start bit
            else if (bit_ >= 1 && bit_ <= 8) value_ |= (tx & 1u) << (bit_ - 1);
            else if (bit_ == 9) {
                active_ = false;
                if (tx) {
                    byte = static_cast<uint8_t>(value_);
                    done = true;
                } else {
                    ++framing_errors;
                }
            }
            ++bit_;
        }
        previous_ = tx;
        return done;
    }

    bool busy() const { return active_; }
    uint64_t framing_errors = 0;

  private:
    bool active_ = false;
    uint8_t previous_ = 1;
    unsigned count_ = 0, bit_ = 0, value_ = 0;
};

class Twin {
  public:
    Twin() : top_(new Vboard_top(&context_)) {}

    ~Twin() { top_->final(); }

    // Runs until the host hangs up or a signal asks to stop.
    void run() {
        std::printf("pty %s\n", pty_.path.c_str());
        std::fflush(stdout);
        reset();
        if (!wait_for_host()) return;
        pty_.release_hold();
        uint64_t quiet = 0;
        while (!stop_requested) {
            if (cycle_ % 64 == 0 && !read_host()) return;
            top_->rx = serializer_.level(rx_queue_);
            top_->eval();
            uint8_t byte;
            if (deserializer_.sample(top_->tx, byte)) {
                tx_pending_.push_back(byte);
                ++tx_bytes_;
            }
            if (!tx_pending_.empty() && !write_host()) return;
            tick();
            bool active = serializer_.busy() || deserializer_.busy() || !rx_queue_.empty()
                          || !tx_pending_.empty() || top_->busy;
            quiet = active ? 0 : quiet + 1;
            if (quiet >= IDLE_AFTER && quiet % IDLE_CYCLES == 0 && !wait_idle()) return;
        }
    }

    void summary() const {
        std::fprintf(stderr, "cycles %llu rx_bytes %llu tx_bytes %llu tx_framing_errors %llu\n",
                     static_cast<unsigned long long>(cycle_),
                     static_cast<unsigned long long>(rx_bytes_),
                     static_cast<unsigned long long>(tx_bytes_),
                     static_cast<unsigned long long>(deserializer_.framing_errors));
    }

  private:
    void tick() {
        top_->clk = 1;
        top_->eval();
        top_->clk = 0;
        top_->eval();
        ++cycle_;
    }

    void reset() {
        top_->clk = 0;
        top_->rst = 1;
        top_->rx = 1;
        top_->eval();
        tick();
        tick();
        top_->rst = 0;
        top_->eval();
    }

    // Blocks (without running the clock) until the host's first byte; false on a signal.
    bool wait_for_host() {
        while (!stop_requested) {
            pollfd fd{pty_.master, POLLIN, 0};
            int ready = poll(&fd, 1, 100);
            if (ready < 0 && errno != EINTR) fail(std::string("poll: ") + std::strerror(errno));
            if (ready > 0 && (fd.revents & POLLIN)) return read_host();
        }
        return false;
    }

    // Waits up to a millisecond for the host; false when it has hung up or on a signal.
    bool wait_idle() {
        pollfd fd{pty_.master, POLLIN, 0};
        int ready = poll(&fd, 1, 1);
        if (ready < 0 && errno != EINTR) fail(std::string("poll: ") + std::strerror(errno));
        if (ready > 0 && (fd.revents & (POLLHUP | POLLERR)) && !(fd.revents & POLLIN))
            return false;
        return !stop_requested;
    }

    // Reads what the host wrote into the rx queue; false when the host has hung up.
    bool read_host() {
        if (rx_queue_.size() >= RX_QUEUE) return true;
        uint8_t buffer[1024];
        ssize_t got = read(pty_.master, buffer, sizeof buffer);
        if (got > 0) {
            rx_queue_.insert(rx_queue_.end(), buffer, buffer + got);
            rx_bytes_ += static_cast<uint64_t>(got);
            return true;
        }
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) return true;
        return false;                                   // EIO or end of file: hung up
    }

    // Writes pending tx bytes to the host; false when it has hung up.
    bool write_host() {
        ssize_t put = write(pty_.master, tx_pending_.data(), tx_pending_.size());
        if (put > 0) {
            tx_pending_.erase(tx_pending_.begin(), tx_pending_.begin() + put);
            return true;
        }
        return put < 0 && (errno == EAGAIN || errno == EINTR);
    }

    VerilatedContext context_;
    std::unique_ptr<Vboard_top> top_;
    Pty pty_;
    Serializer serializer_;
    Deserializer deserializer_;
    std::deque<uint8_t> rx_queue_;
    std::vector<uint8_t> tx_pending_;
    uint64_t cycle_ = 0, rx_bytes_ = 0, tx_bytes_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 1) fail("usage: Vboard_top (no arguments)");
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1) return 0;                       // the parent is already gone
    std::signal(SIGTERM, on_signal);
    std::signal(SIGINT, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    Twin twin;
    twin.run();
    twin.summary();
    return 0;
}
