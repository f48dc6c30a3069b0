%% Erlang/OTP peer for P1: ping-pong round trips and 64-sender fan-in, same work as the Rust
%% side. Run: escript benches/peers/erlang_bench.erl ROUND_TRIPS FANIN_PER_SENDER
%% Prints: pingpong_per_s=N fanin_per_s=N
-module(erlang_bench).
-export([main/1]).
-mode(compile).

main([RT, PerSender]) ->
    N = list_to_integer(RT),
    M = list_to_integer(PerSender),
    PP = pingpong(N),
    FI = fanin(64, M),
    io:format("pingpong_per_s=~p fanin_per_s=~p~n", [round(PP), round(FI)]).

echo() ->
    receive
        {From, Ref, X} -> From ! {Ref, X + 1}, echo();
        stop -> ok
    end.

pingpong(N) ->
    Echo = spawn(fun echo/0),
    T0 = erlang:monotonic_time(microsecond),
    loop(Echo, N),
    T1 = erlang:monotonic_time(microsecond),
    Echo ! stop,
    N / ((T1 - T0) / 1.0e6).

loop(_, 0) -> ok;
loop(Echo, N) ->
    Ref = make_ref(),
    Echo ! {self(), Ref, N},
    receive {Ref, _} -> ok end,
    loop(Echo, N - 1).

counter(0, Parent) -> Parent ! done;
counter(Left, Parent) ->
    receive {add, _} -> counter(Left - 1, Parent) end.

fanin(Senders, PerSender) ->
    Total = Senders * PerSender,
    Self = self(),
    C = spawn(fun() -> counter(Total, Self) end),
    T0 = erlang:monotonic_time(microsecond),
    [spawn(fun() -> send_n(C, PerSender) end) || _ <- lists:seq(1, Senders)],
    receive done -> ok end,
    T1 = erlang:monotonic_time(microsecond),
    Total / ((T1 - T0) / 1.0e6).

send_n(_, 0) -> ok;
send_n(C, N) -> C ! {add, N}, send_n(C, N - 1).
